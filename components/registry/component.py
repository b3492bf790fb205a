"""KFP components for the promotion gate: read the champion, promote a challenger."""

from kfp import dsl
from kfp.dsl import Input, Model

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def champion(config_yaml: str, registry_uri: str) -> float:
    """Accuracy of the currently promoted model (-1 when none)."""
    from components.runtime import champion_accuracy, load_cfg

    load_cfg(config_yaml)  # configures the S3 endpoint
    return champion_accuracy(registry_uri)


@dsl.component(base_image=RUNTIME_IMAGE)
def champion_uri(config_yaml: str, registry_uri: str, warm_start: bool) -> str:
    """The last promoted model's URI when warm-starting ('' otherwise or when none)."""
    from components.runtime import champion_model_uri, load_cfg

    load_cfg(config_yaml)
    return champion_model_uri(registry_uri) if warm_start else ""


@dsl.component(base_image=RUNTIME_IMAGE)
def promote(config_yaml: str, registry_uri: str, model: Input[Model], accuracy: float) -> str:
    """Publish the RL model as the new champion (only reached when it beats the current one)."""
    import time

    from components.runtime import load_cfg
    from components.runtime import promote as _promote

    load_cfg(config_yaml)
    return _promote(registry_uri, model, accuracy, run_name=time.strftime("%Y%m%d-%H%M%S"))
