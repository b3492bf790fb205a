"""`r1zero run --runner docker`: the pipeline through kfp.local's DockerRunner in the runtime image.

The slow tests build (or reuse) the runtime image (session fixture ``runtime_image``,
tests/conftest.py), run the whole pipeline on a shrunken tiny preset with every task in a container
of it, and run the same config with the default subprocess runner: each task's outputs exist, were
written by the image's non-root uid, the metrics parse, and both runners reach the same summary and
the same weights. The bad-input tests need no image.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.local_run import SMOKE_SETS as TINY
from r1zero.errors import UserError
from r1zero.images import BASE_NAME, BASE_SUITE, UID, base_hash

REPO = Path(__file__).resolve().parents[2]
# each task and the artifact files it must leave in kfp.local's pipeline root
TASK_OUTPUTS = {
    "data-mix": ["data/manifest.json"],
    "pretrain": ["model/model.safetensors", "model/config.json", "curves/metrics.jsonl"],
    "grpo": ["model/model.safetensors", "model/config.json", "curves/metrics.jsonl"],
    "evaluate": ["result/metrics.json", "result/per_problem.jsonl", "report"],
    "evaluate-2": ["result/metrics.json", "result/per_problem.jsonl", "report"],
    "detect-insight": ["result/insights.json"],
    "summarize": ["summary/summary.json", "table"],
    "champion-uri": [], "champion": [], "promote": [], "cleanup-jobs": [],
}


def _run(out: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    sets = [a for o in TINY for a in ("--set", o)]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "r1zero.cli", "run", "--config", "configs/tiny.yaml",
                          "--out", str(out), *sets, *extra], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return res, time.perf_counter() - t0


@pytest.fixture(scope="module")
def docker_run(runtime_image, tmp_path_factory):
    out = tmp_path_factory.mktemp("docker-run")
    res, wall = _run(out, "--runner", "docker")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"docker runner ({runtime_image}): {wall:.0f} s wall")
    return out, res


@pytest.fixture(scope="module")
def subprocess_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("subprocess-run")
    res, wall = _run(out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"subprocess runner: {wall:.0f} s wall")
    return out, res


def _run_dir(out: Path) -> Path:
    (run,) = (out / "kfp").glob("r1zero-*")
    return run


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_docker_runner_runs_every_task_in_the_image(docker_run, runtime_image):
    out, res = docker_run
    assert f"Found image '{runtime_image}'" in res.stdout  # kfp.local's DockerRunner ran the tasks
    run = _run_dir(out)
    assert {p.name for p in run.iterdir()} == set(TASK_OUTPUTS)
    for task, files in TASK_OUTPUTS.items():
        executor_output = run / task / "executor_output.json"
        json.loads(executor_output.read_text())
        # written inside the container, as the image's non-root uid (not the caller's)
        assert executor_output.stat().st_uid == UID, task
        for f in files:
            assert (run / task / f).exists(), f"{task}/{f}"
            assert (run / task / f).stat().st_uid == UID, f"{task}/{f}"
    # the final metrics parse: the summary, the RL evaluation's KFP metrics and its metrics.json
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["base_accuracy"] <= 1.0 and 0.0 <= summary["rl_accuracy"] <= 1.0
    assert set(summary["stage_seconds"]) == {"data_mix", "pretrain", "grpo", "evaluate_base", "evaluate_rl",
                                             "detect_insight"}
    kfp_metrics = json.loads((run / "evaluate-2" / "executor_output.json").read_text())
    acc = kfp_metrics["artifacts"]["metrics"]["artifacts"][0]["metadata"]["accuracy"]
    assert acc == pytest.approx(summary["rl_accuracy"])
    assert json.loads((run / "evaluate-2" / "result" / "metrics.json").read_text())["overall"]["n_problems"] > 0
    # the promotion gate wrote the registry (a mounted directory outside the pipeline root)
    promoted = json.loads((out / "registry" / "promoted.json").read_text())
    assert Path(promoted["model_uri"], "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_docker_runner_reaches_the_subprocess_summary(docker_run, subprocess_run):
    """Same config and seed: the same accuracies, events and weights whichever runner ran the tasks."""
    d, s = (json.loads((o / "summary.json").read_text()) for o in (docker_run[0], subprocess_run[0]))
    for key in ("base_accuracy", "rl_accuracy", "base_ci", "rl_ci", "events"):
        assert d[key] == s[key], key
    for task in ("pretrain", "grpo"):
        weights = [_sha(_run_dir(o[0]) / task / "model" / "model.safetensors") for o in (docker_run, subprocess_run)]
        assert weights[0] == weights[1], f"{task} weights differ between the docker and subprocess runners"


def test_docker_runner_without_engine_is_one_line(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "r1zero.cli", "run", "--runner", "docker", "--config",
                          "configs/tiny.yaml", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Docker engine answers" in lines[0] and "Traceback" not in res.stderr
    assert not out.exists()  # nothing half-written


def test_unknown_runner_is_refused():
    res = subprocess.run([sys.executable, "-m", "r1zero.cli", "run", "--runner", "podman", "--config",
                          "configs/tiny.yaml"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "invalid choice: 'podman'" in res.stderr


@pytest.mark.slow
def test_preflight_refuses_a_missing_image_and_a_root_image(images):
    from r1zero.cluster.docker_runner import preflight

    with pytest.raises(UserError, match=r"runtime image ghcr.io/r1zero/no-such-image:0 not found: build it with "
                                        r"`python -m r1zero.images build`"):
        preflight("ghcr.io/r1zero/no-such-image:0")
    # the Debian base the images start from has no USER: it would run the tasks as root
    with pytest.raises(UserError, match=rf"runs as user 'root', not the non-root uid {UID}"):
        preflight(f"{BASE_NAME}:{BASE_SUITE}-{base_hash()}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupted_docker_run_leaves_no_container(runtime_image, tmp_path):
    """Ctrl-C while a task runs: r1zero exits 130 and removes the task's container (kfp.local
    would leave it running)."""
    from r1zero.cluster.docker_runner import RUN_LABEL
    from r1zero.images import docker

    def ours() -> list[str]:
        return docker("ps", "--all", "--quiet", "--filter", f"label={RUN_LABEL}").stdout.split()

    deadline = time.monotonic() + 60
    while ours():  # an earlier run's last container may still be in docker's auto-removal
        assert time.monotonic() < deadline, "task containers of an earlier run are still there"
        time.sleep(1)
    # the whole tiny preset: its first task (the data mix) runs long enough to be interrupted
    proc = subprocess.Popen([sys.executable, "-m", "r1zero.cli", "run", "--runner", "docker", "--config",
                             "configs/tiny.yaml", "--out", str(tmp_path / "run")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not ours():
            assert proc.poll() is None and time.monotonic() < deadline, "no task container started"
            time.sleep(0.5)
        time.sleep(2)
        assert ours(), "the task finished before the interrupt"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "r1zero: interrupted" in err
    assert not ours()


def test_container_settings(tmp_path):
    from r1zero.cluster.docker_runner import RUN_LABEL, container_run_args

    args = container_run_args([tmp_path], "run-1")
    assert args["labels"] == {RUN_LABEL: "run-1"}
    assert args["entrypoint"] == [] and args["network_mode"] == "none" and args["read_only"] is True
    assert args["cap_drop"] == ["ALL"] and args["security_opt"] == ["no-new-privileges"]
    assert "user" not in args  # the image's own non-root USER (checked by preflight)
    assert [(m["Source"], m["Target"], m["Type"]) for m in args["mounts"]] == [(str(tmp_path), str(tmp_path), "bind")]
    assert args["environment"]["HOME"] == "/tmp" and "/tmp" in args["tmpfs"] and args["hostname"] == "localhost"
