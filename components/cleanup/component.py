"""KFP exit-handler component: delete training jobs this run left behind."""

from kfp import dsl

from r1zero.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE)
def cleanup_jobs(config_yaml: str, target: str, run_id: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """Runs whatever happened (ExitHandler). In a cluster, deletes this run's PyTorchJobs/MPIJobs."""
    from components.runtime import cleanup, load_cfg

    cfg = load_cfg(config_yaml)
    return cleanup(cfg, target, status.state, run_id)
