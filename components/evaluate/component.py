"""KFP component: evaluation (``r1zero eval``): pass@k, maj@k, CIs, HTML report."""

from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def evaluate(config_yaml: str, target: str, run_id: str, model_uri: str, data_uri: str, result: Output[Artifact],
             report: Output[HTML], metrics: Output[Metrics],
             baseline: Optional[Input[Artifact]] = None,  # noqa: UP045 (kfp needs Optional)
             curves: Optional[Input[Artifact]] = None) -> float:  # noqa: UP045
    """Evaluate a model on the held-out split (``r1zero eval``; ``target='cluster'``: a one-GPU
    job); returns greedy pass@1 (the promotion metric)."""
    from components.runtime import run_evaluate

    return run_evaluate(config_yaml, target, model_uri, data_uri, result, report, metrics, baseline, curves, run_id)
