"""KFP component: MoE pretraining (``r1zero pretrain``), in-process or as a PyTorchJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def pretrain(config_yaml: str, target: str, run_id: str, data: Input[Dataset], model: Output[Model],
             metrics: Output[Metrics]):
    """Pretrain the base model; ``target='cluster'`` launches the sized PyTorchJob and waits."""
    from components.runtime import run_pretrain

    run_pretrain(config_yaml, target, data, model, metrics, run_id)
