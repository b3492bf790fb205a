"""KFP component: the run summary (base vs RL with intervals, events, stage durations)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def summarize(data_seconds: float, base_curves: Input[Artifact], rl_curves: Input[Artifact],
              base_eval: Input[Artifact], rl_eval: Input[Artifact], insight: Input[Artifact],
              summary: Output[Artifact], table: Output[Markdown]):
    """Write summary.json (base_accuracy, rl_accuracy, events, stage_seconds, ...) and a table from
    the small artifacts only (curves, eval results, insights)."""
    from components.runtime import write_summary

    write_summary(data_seconds, base_curves, rl_curves, base_eval, rl_eval, insight, summary, table)
