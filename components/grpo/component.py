"""KFP component: GRPO reinforcement learning (``r1zero grpo``), in-process or as a PyTorchJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def grpo(config_yaml: str, target: str, run_id: str, warm_start_uri: str, base: Input[Model], data: Input[Dataset],
         model: Output[Model], metrics: Output[Metrics]):
    """RL from the base model (or from ``warm_start_uri``, the last promoted model, when set)."""
    from components.runtime import artifact_uri, run_grpo

    policy = warm_start_uri or artifact_uri(base)
    run_grpo(config_yaml, target, policy, data, model, metrics, run_id)
