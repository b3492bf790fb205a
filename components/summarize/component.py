"""KFP component: the run summary (base vs RL with intervals, events, stage durations)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def summarize(data: Input[Dataset], base: Input[Model], rl: Input[Model], base_eval: Input[Artifact],
              rl_eval: Input[Artifact], insight: Input[Artifact], summary: Output[Artifact],
              table: Output[Markdown]):
    """Write summary.json (base_accuracy, rl_accuracy, events, stage_seconds, ...) and a table."""
    from components.runtime import write_summary

    write_summary(data, base, rl, base_eval, rl_eval, insight, summary, table)
