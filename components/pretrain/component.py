"""KFP component: MoE pretraining (``r1zero pretrain``), in-process or as a PyTorchJob."""

from kfp import dsl
from kfp.dsl import Artifact, Metrics, Model, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def pretrain(config_yaml: str, target: str, run_id: str, data_uri: str, model: Output[Model],
             curves: Output[Artifact], metrics: Output[Metrics]) -> str:
    """Pretrain the base model (``r1zero pretrain``); ``target='cluster'`` launches the sized
    PyTorchJob and waits. Returns the model's URI; ``curves`` holds metrics.jsonl/summary.json."""
    from components.runtime import run_pretrain

    return run_pretrain(config_yaml, target, data_uri, model, curves, metrics, run_id)
