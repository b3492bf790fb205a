"""KFP component: evaluation (``r1zero eval``): pass@k, maj@k, CIs, HTML report."""

from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def evaluate(config_yaml: str, model: Input[Model], data: Input[Dataset], result: Output[Artifact],
             report: Output[HTML], metrics: Output[Metrics], baseline: Optional[Input[Artifact]] = None) -> float:  # noqa: UP045 (kfp needs Optional)
    """Evaluate a model on the held-out split; returns greedy pass@1 (the promotion metric)."""
    from components.runtime import run_evaluate

    return run_evaluate(config_yaml, model, data, result, report, metrics, baseline)
