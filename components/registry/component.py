"""KFP components for the promotion gate: re-evaluate the champion on this run's split, promote a challenger."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Metrics, Output

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def champion(config_yaml: str, target: str, run_id: str, registry_uri: str, data_uri: str,
             result: Output[Artifact], report: Output[HTML], metrics: Output[Metrics]) -> float:
    """The promoted model's greedy pass@1 re-evaluated on THIS run's eval split (-1 when none)."""
    from components.runtime import run_champion_eval

    return run_champion_eval(config_yaml, target, registry_uri, data_uri, result, report, metrics, run_id)


@dsl.component(base_image=RUNTIME_IMAGE)
def champion_uri(config_yaml: str, registry_uri: str, warm_start: bool) -> str:
    """The last promoted model's URI when warm-starting ('' otherwise or when none)."""
    from components.runtime import champion_model_uri, load_cfg

    load_cfg(config_yaml)
    return champion_model_uri(registry_uri) if warm_start else ""


@dsl.component(base_image=RUNTIME_IMAGE)
def promote(config_yaml: str, registry_uri: str, model_uri: str, accuracy: float) -> str:
    """Publish the RL model as the new champion (only reached when it beats the current one)."""
    import time

    from components.runtime import load_cfg
    from components.runtime import promote as _promote

    load_cfg(config_yaml)
    return _promote(registry_uri, model_uri, accuracy, run_name=time.strftime("%Y%m%d-%H%M%S"))
