"""KFP component: GRPO reinforcement learning (``r1zero grpo``), in-process or as a PyTorchJob."""

from kfp import dsl
from kfp.dsl import Artifact, Metrics, Model, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def grpo(config_yaml: str, target: str, run_id: str, warm_start_uri: str, base_uri: str, data_uri: str,
         model: Output[Model], curves: Output[Artifact], metrics: Output[Metrics]) -> str:
    """RL (``r1zero grpo``) from the base model (or from ``warm_start_uri``, the last promoted model,
    when set). Returns the RL model's URI; ``curves`` holds its metrics.jsonl/summary.json."""
    from components.runtime import run_grpo

    return run_grpo(config_yaml, target, warm_start_uri or base_uri, data_uri, model, curves, metrics, run_id)
