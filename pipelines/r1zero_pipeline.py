"""The r1zero Kubeflow pipeline: data mix -> pretrain -> GRPO -> evaluate (base and RL) ->
insight detection -> summary, with a promotion gate and an exit handler.

    r1zero pipeline compile                      # writes pipelines/r1zero_pipeline.yaml
    r1zero run --config configs/tiny.yaml        # the same definition through kfp.local on CPU

Parameters: ``config_yaml`` (the resolved config, :meth:`r1zero.config.Config.to_yaml`),
``target`` (``local``: each stage's ``r1zero`` command line runs inside the component;
``cluster``: pretrain and GRPO launch the sized PyTorchJob, evaluation a one-GPU job, and wait),
``registry_uri`` (where promoted models live; empty disables promotion) and ``warm_start`` (GRPO
starts from the last promoted model instead of the fresh base).

Stages pass only what they read: data and models as URIs (string outputs; the KFP launcher
downloads every input artifact into the pod, and a 13B model must not pass through CPU pods), the
training curves and evaluation results as small artifacts. The promotion gate compares the RL
model with the champion re-evaluated on this run's eval split.

Cluster-only settings (S3 secret as env, node selector, tolerations, timeouts) are set with
kfp-kubernetes; ``kfp.local`` ignores them, so one definition serves both targets. The pods run
under KFP's runner service account, which the manifests bind to the launcher Role.
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
        kubernetes.set_timeout(task, LAUNCH_TIMEOUT_S)
    else:
        kubernetes.set_timeout(task, STAGE_TIMEOUT_S)
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="R1-Zero: MoE pretraining -> GRPO -> eval -> aha detection")
def r1zero_pipeline(config_yaml: str, target: str = "local", registry_uri: str = "", warm_start: bool = False):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    cleanup = _platform(cleanup_jobs(config_yaml=config_yaml, target=target, run_id=run_id))
    with dsl.ExitHandler(cleanup, name="r1zero-run"):
        data = _platform(data_mix(config_yaml=config_yaml)).set_display_name("data mix")
        data_uri = data.outputs["uri"]
        base = _platform(pretrain(config_yaml=config_yaml, target=target, run_id=run_id, data_uri=data_uri),
                         launcher=True).set_display_name("pretrain (MoE)")
        start = _platform(champion_uri(config_yaml=config_yaml, registry_uri=registry_uri, warm_start=warm_start))
        start.set_caching_options(enable_caching=False).set_display_name("warm start")
        rl = _platform(grpo(config_yaml=config_yaml, target=target, run_id=run_id, warm_start_uri=start.output,
                            base_uri=base.outputs["Output"], data_uri=data_uri),
                       launcher=True).set_display_name("GRPO")
        base_eval = _platform(evaluate(config_yaml=config_yaml, target=target, run_id=run_id,
                                       model_uri=base.outputs["Output"], data_uri=data_uri),
                              launcher=True).set_display_name("evaluate base")
        rl_eval = _platform(evaluate(config_yaml=config_yaml, target=target, run_id=run_id,
                                     model_uri=rl.outputs["Output"], data_uri=data_uri,
                                     baseline=base_eval.outputs["result"], curves=rl.outputs["curves"]),
                            launcher=True).set_display_name("evaluate RL")
        insight = _platform(detect_insight(config_yaml=config_yaml, curves=rl.outputs["curves"]))
        insight.set_display_name("insight detection")
        _platform(summarize(data_seconds=data.outputs["seconds"], base_curves=base.outputs["curves"],
                            rl_curves=rl.outputs["curves"], base_eval=base_eval.outputs["result"],
                            rl_eval=rl_eval.outputs["result"], insight=insight.outputs["result"])
                  ).set_display_name("summary")
        # The champion re-evaluated on this run's eval split: accuracies on different splits do
        # not compare. Without a registry or a champion it returns -1 without evaluating.
        best = _platform(champion(config_yaml=config_yaml, target=target, run_id=run_id, registry_uri=registry_uri,
                                  data_uri=data_uri), launcher=True)
        best.set_display_name("champion on this split")
        # Promotion gate: publish the RL model only when it beats the current one.
        with dsl.If(rl_eval.outputs["Output"] > best.outputs["Output"], name="rl-beats-champion"):
            with dsl.If(registry_uri != "", name="registry-set"):
                _platform(promote(config_yaml=config_yaml, registry_uri=registry_uri, model_uri=rl.outputs["Output"],
                                  accuracy=rl_eval.outputs["Output"])).set_caching_options(
                    enable_caching=False).set_display_name("promote RL model")


def compile_pipeline(path: str) -> str:
    """Compile the pipeline to IR YAML (deterministic: no timestamps in the output)."""
    from kfp import compiler

    compiler.Compiler().compile(pipeline_func=r1zero_pipeline, package_path=path)
    return path
