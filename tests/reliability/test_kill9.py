"""kill -9 of one rank mid-run, as a PyTorchJob pod loss would: torchrun (``--max-restarts 1``)
restarts the worker group, the run resumes from the last checkpoint and its final metrics and
model equal an uninterrupted run's.

Each test runs the stage twice with 2 gloo ranks on loopback: once uninterrupted (the reference),
once with SIGKILL sent to the RANK=1 worker as soon as a mid-run checkpoint has appeared. Compared:
every metric row except wall-clock rates (``tokens_per_s``, ``seconds``), the summary's loss list and
the sha256 of the saved ``model.safetensors``.

    .venv/bin/python -m pytest tests/reliability/test_kill9.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from relutil import REPO, TINY_POLICY, TINY_TRAIN, cli_env, metric_rows, run_cli, torchrun_cmd, worker_pid  # noqa: E402

TIMING = ("tokens_per_s", "seconds", "per_s", "_time")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _run(args: list[str], log: Path, max_restarts: int = 0) -> subprocess.Popen:
    f = open(log, "w")  # noqa: SIM115 - closed by the caller through the Popen's lifetime
    return subprocess.Popen(torchrun_cmd(2, args, max_restarts), cwd=REPO, env=cli_env(), stdout=f,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    text = log.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    return text


def kill_rank_when(proc: subprocess.Popen, ready, rank: int = 1, timeout: float = 300) -> float:
    """SIGKILL the ``rank`` worker as soon as ``ready()`` is true; returns the kill time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before the kill point"
        if ready():
            pid = worker_pid(proc.pid, rank)
            assert pid is not None, "rank worker not found"
            os.kill(pid, signal.SIGKILL)
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError("kill point not reached in time")


@pytest.mark.slow
def test_pretrain_kill9_one_rank_resumes_and_matches_uninterrupted(tiny_data, tmp_path):
    steps, every = 60, 10
    args = ["pretrain", "--config", "configs/tiny.yaml", *TINY_TRAIN, "--set", "parallel.dp=2",
            "--set", f"pretrain.steps={steps}", "--set", f"pretrain.checkpoint_every={every}",
            "--set", "pretrain.keep_last=3", "--data", str(tiny_data)]
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    _wait(_run([*args, "--out", ref_out], tmp_path / "ref.log"), tmp_path / "ref.log")

    log = tmp_path / "killed.log"
    proc = _run([*args, "--out", out], log, max_restarts=1)
    ckpts = out / "checkpoints"
    kill_rank_when(proc, lambda: (ckpts / f"step-{2 * every:08d}").is_dir())
    text = _wait(proc, log)

    summary = json.loads((out / "summary.json").read_text())
    ref = json.loads((ref_out / "summary.json").read_text())
    # torchrun saw the SIGKILL, started a second worker group, which resumed from a mid-run checkpoint
    assert "exitcode: -9" in text, text[-3000:]
    assert 2 * every <= summary["start_step"] < steps and summary["start_step"] % every == 0
    assert summary["steps"] == steps
    assert metric_rows(out / "metrics.jsonl", TIMING) == metric_rows(ref_out / "metrics.jsonl", TIMING)
    assert summary["final_loss"] == ref["final_loss"]
    assert _sha(out / "model.safetensors") == _sha(ref_out / "model.safetensors")


@pytest.mark.slow
def test_grpo_kill9_one_rank_resumes_and_matches_uninterrupted(tiny_policy, tiny_data, tmp_path):
    steps, every = 24, 4
    args = ["grpo", "--config", "configs/tiny.yaml", "--set", f"grpo.steps={steps}",
            "--set", f"grpo.checkpoint_every={every}", "--set", "grpo.prompts_per_step=4", "--set", "grpo.group_size=4",
            "--set", "grpo.max_new_tokens=16", "--set", "grpo.eval_every=8", "--set", "grpo.eval_problems=4",
            "--set", "grpo.sample_every=4", "--set", "telemetry.enabled=false",
            "--policy", str(tiny_policy), "--data", str(tiny_data)]
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    _wait(_run([*args, "--out", ref_out], tmp_path / "ref.log"), tmp_path / "ref.log")

    log = tmp_path / "killed.log"
    proc = _run([*args, "--out", out], log, max_restarts=1)
    ckpts = out / "checkpoints"
    kill_rank_when(proc, lambda: (ckpts / f"step-{2 * every:08d}").is_dir())
    text = _wait(proc, log)

    assert "exitcode: -9" in text, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps
    resumed = [int(m) for m in re.findall(r"grpo: resumed from step (\d+)", text)]
    assert len(resumed) == 1 and 2 * every <= resumed[0] < steps and resumed[0] % every == 0, resumed
    assert metric_rows(out / "metrics.jsonl", TIMING) == metric_rows(ref_out / "metrics.jsonl", TIMING)
    assert _sha(out / "model.safetensors") == _sha(ref_out / "model.safetensors")
    assert [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()] == \
        [json.loads(x) for x in (ref_out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_corrupted_latest_checkpoints_fall_back_to_the_previous_valid_one(tiny_policy, tiny_data, tmp_path):
    """End to end (``r1zero pretrain``, world of one): in a copy of the session's 20-step run, truncate
    the newest checkpoint's engine shard and flip one byte in the one before; the rerun warns, resumes
    from the oldest valid checkpoint (step 10) and reproduces the original run's metrics and weights."""
    import shutil

    from r1zero.train.checkpoint import MANIFEST

    out = tmp_path / "run"
    shutil.copytree(tiny_policy, out)
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000010", "step-00000015", "step-00000020"]

    def shard(step: int) -> Path:
        files = json.loads((ck / f"step-{step:08d}" / MANIFEST).read_text())["files"]
        return ck / f"step-{step:08d}" / max((k for k in files if k.startswith("engine/")), key=lambda k: files[k]["size"])

    newest = shard(20)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    middle = shard(15)
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    middle.write_bytes(bytes(data))

    again = run_cli("pretrain", "--config", "configs/tiny.yaml", *TINY_POLICY, "--data", str(tiny_data),
                    "--out", str(out), env=cli_env(PYTHONWARNINGS="default"))  # the fallback is reported as a warning
    assert again.returncode == 0, again.stderr[-2000:]
    assert "step-00000020" in again.stderr and "truncated" in again.stderr
    assert "step-00000015" in again.stderr and "checksum mismatch" in again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_step"] == 10 and summary["steps"] == 20
    assert metric_rows(out / "metrics.jsonl", TIMING) == metric_rows(tiny_policy / "metrics.jsonl", TIMING)
    assert _sha(out / "model.safetensors") == _sha(tiny_policy / "model.safetensors")
