"""KFP component: "aha moment" detection (``r1zero insight detect``) on the RL training curves."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def detect_insight(config_yaml: str, rl_model: Input[Model], result: Output[Artifact], metrics: Output[Metrics]):
    """Detect jumps, knees, reflection rises and aha events in the GRPO run's metrics.jsonl."""
    from components.runtime import run_insight

    run_insight(config_yaml, rl_model, result, metrics)
