"""KFP component: data mixing (``r1zero data mix``) -> a Dataset directory."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def data_mix(config_yaml: str, data: Output[Dataset], metrics: Output[Metrics]):
    """Generate, import, dedup, filter and shard the task mix; train the tokenizer."""
    from components.runtime import run_data_mix

    run_data_mix(config_yaml, data, metrics)
