"""The r1zero Kubeflow pipeline: data mix -> pretrain -> GRPO -> evaluate (base and RL) ->
insight detection -> summary, with a promotion gate and an exit handler.

    r1zero pipeline compile                      # writes pipelines/r1zero_pipeline.yaml
    r1zero run --config configs/tiny.yaml        # the same definition through kfp.local on CPU

Parameters: ``config_yaml`` (the resolved config tree as YAML text), ``target`` (``local``:
stages run inside the component; ``cluster``: pretrain and GRPO launch the sized PyTorchJob and
wait), ``registry_uri`` (where promoted models live; empty disables promotion) and
``warm_start`` (GRPO starts from the last promoted model instead of the fresh base).

Cluster-only settings (S3 secret as env, node selector, tolerations, PVC, timeouts) are set with
kfp-kubernetes; ``kfp.local`` ignores them, so one definition serves both targets.
"""


from kfp import dsl, kubernetes

from components.cleanup.component import cleanup_jobs
from components.data_mix.component import data_mix
from components.detect_insight.component import detect_insight
from components.evaluate.component import evaluate
from components.grpo.component import grpo
from components.pretrain.component import pretrain
from components.registry.component import champion, champion_uri, promote
from components.summarize.component import summarize

PIPELINE_NAME = "r1zero"
S3_SECRET = "r1zero-s3"  # keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / R1ZERO_S3_ENDPOINT
CACHE_PVC = "r1zero-cache"
LAUNCH_TIMEOUT_S = 7 * 24 * 3600  # a week: pretraining at the a100-13b scale runs for days
STAGE_TIMEOUT_S = 6 * 3600


def _platform(task: dsl.PipelineTask, *, launcher: bool = False) -> dsl.PipelineTask:
    """Cluster settings for every task; launchers also get caching off, retries and a timeout."""
    kubernetes.use_secret_as_env(
        task, secret_name=S3_SECRET,
        secret_key_to_env={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                           "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
                           "R1ZERO_S3_ENDPOINT": "R1ZERO_S3_ENDPOINT"},
    )
    kubernetes.add_pod_annotation(task, "sidecar.istio.io/inject", "false")
    kubernetes.add_node_selector(task, label_key="r1zero.io/pool", label_value="cpu")
    kubernetes.add_toleration(task, key="r1zero.io/pool", operator="Equal", value="cpu", effect="NoSchedule")
    if launcher:
        # A rerun with the same inputs must train again, not silently reuse the cache.
        task.set_caching_options(enable_caching=False)
        task.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")
        kubernetes.mount_pvc(task, pvc_name=CACHE_PVC, mount_path="/cache")
        kubernetes.set_timeout(task, LAUNCH_TIMEOUT_S)
    else:
        kubernetes.set_timeout(task, STAGE_TIMEOUT_S)
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="R1-Zero: MoE pretraining -> GRPO -> eval -> aha detection")
def r1zero_pipeline(config_yaml: str, target: str = "local", registry_uri: str = "", warm_start: bool = False):
    cleanup = _platform(cleanup_jobs(config_yaml=config_yaml, target=target, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER))
    with dsl.ExitHandler(cleanup, name="r1zero-run"):
        data = _platform(data_mix(config_yaml=config_yaml)).set_display_name("data mix")
        base = _platform(pretrain(config_yaml=config_yaml, target=target, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                  data=data.outputs["data"]),
                         launcher=True).set_display_name("pretrain (MoE)")
        start = _platform(champion_uri(config_yaml=config_yaml, registry_uri=registry_uri, warm_start=warm_start))
        start.set_caching_options(enable_caching=False).set_display_name("warm start")
        rl = _platform(grpo(config_yaml=config_yaml, target=target, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                            warm_start_uri=start.output,
                            base=base.outputs["model"], data=data.outputs["data"]),
                       launcher=True).set_display_name("GRPO")
        base_eval = _platform(evaluate(config_yaml=config_yaml, model=base.outputs["model"],
                                       data=data.outputs["data"])).set_display_name("evaluate base")
        rl_eval = _platform(evaluate(config_yaml=config_yaml, model=rl.outputs["model"], data=data.outputs["data"],
                                     baseline=base_eval.outputs["result"])).set_display_name("evaluate RL")
        insight = _platform(detect_insight(config_yaml=config_yaml, rl_model=rl.outputs["model"]))
        insight.set_display_name("insight detection")
        _platform(summarize(data=data.outputs["data"], base=base.outputs["model"], rl=rl.outputs["model"],
                            base_eval=base_eval.outputs["result"], rl_eval=rl_eval.outputs["result"],
                            insight=insight.outputs["result"])).set_display_name("summary")
        best = _platform(champion(config_yaml=config_yaml, registry_uri=registry_uri))
        best.set_caching_options(enable_caching=False).set_display_name("current champion")
        # Promotion gate: publish the RL model only when it beats the current one.
        with dsl.If(rl_eval.outputs["Output"] > best.output, name="rl-beats-champion"):
            with dsl.If(registry_uri != "", name="registry-set"):
                _platform(promote(config_yaml=config_yaml, registry_uri=registry_uri, model=rl.outputs["model"],
                                  accuracy=rl_eval.outputs["Output"])).set_caching_options(
                    enable_caching=False).set_display_name("promote RL model")


def compile_pipeline(path: str) -> str:
    """Compile the pipeline to IR YAML (deterministic: no timestamps in the output)."""
    from kfp import compiler

    compiler.Compiler().compile(pipeline_func=r1zero_pipeline, package_path=path)
    return path
