"""KFP component: "aha moment" detection (``r1zero insight detect``) on the RL training curves."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def detect_insight(config_yaml: str, curves: Input[Artifact], result: Output[Artifact], metrics: Output[Metrics]):
    """Detect jumps, knees, reflection rises and aha events in the GRPO run's metrics.jsonl (its
    small ``curves`` artifact: the model is not downloaded for this)."""
    from components.runtime import run_insight

    run_insight(config_yaml, curves, result, metrics)
