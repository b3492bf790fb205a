"""KFP component: data mixing (``r1zero data mix``) -> a Dataset directory."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def data_mix(config_yaml: str, data: Output[Dataset],
             metrics: Output[Metrics]) -> NamedTuple("Outputs", [("uri", str), ("seconds", float)]):
    """Generate, import, dedup, filter and shard the task mix; train the tokenizer (``r1zero data
    mix``). Returns the data's URI (later stages read it there) and the stage's seconds."""
    from collections import namedtuple

    from components.runtime import run_data_mix

    uri, seconds = run_data_mix(config_yaml, data, metrics)
    return namedtuple("Outputs", ["uri", "seconds"])(uri, seconds)
