"""The vLLM image (images/vllm.Dockerfile; session fixture ``vllm_image``), run for real.

A rollout server container (``python -m r1zero.grpo.vllm_rollout serve``, the rendered
StatefulSet's command, as the manifests' uid with a read-only root) and a trainer container of
the same image on a user-made docker network: the trainer's ``ServerEngine`` connects by name
with the key, samples, pushes weights and sees the change; then the server container is frozen
(``docker pause``) and the next push ends in one ``UserError`` line within ``push_timeout_s``.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from r1zero.images import UID, docker, image_user

CHECKS = Path(__file__).with_name("vllm_server_checks.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _policy(out: Path) -> Path:
    """A random Llama with head size 32 (vLLM's CPU attention needs 32..512) and a word-level
    tokenizer: enough for the engine to build, sample and take pushed weights."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 64)}}
    raw = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      eos_token_id=1, pad_token_id=0, bos_token_id=None, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    for p in [out, *out.iterdir()]:  # readable by the containers' uid
        p.chmod(0o755 if p.is_dir() else 0o644)
    return out


def test_vllm_image_runs_the_server_and_the_trainer_tools(vllm_image):
    assert image_user(vllm_image) == str(UID)
    out = docker("run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", vllm_image, "/bin/sh", "-c",
                 "python -c 'import vllm, torch, transformers, r1zero.grpo.vllm_rollout as v; "
                 "print(vllm.__version__, torch.__version__, transformers.__version__, v.PORT)'; "
                 "for c in torchrun deepspeed sshd pdsh; do command -v $c >/dev/null && echo $c; done; "
                 "python -m r1zero.grpo.vllm_rollout serve --help | head -1")
    lines = out.stdout.split("\n")
    vllm_v, torch_v, tf_v, port = lines[0].split()
    assert vllm_v.startswith("0.32.0") and torch_v == "2.13.0+cpu" and tuple(map(int, tf_v.split(".")[:2])) < (5, 20) and port == "7100"
    assert lines[1:5] == ["torchrun", "deepspeed", "sshd", "pdsh"]
    # vLLM's CPU kernels load (they link libnuma: a missing library only shows at engine start)
    kernels = docker("run", "--rm", "--network", "none", vllm_image, "python", "-c",
                     "import torch, vllm._C; print(hasattr(torch.ops._C, 'init_cpu_memory_env'))")
    assert kernels.stdout.split()[-1] == "True", kernels.stdout + kernels.stderr
    assert lines[5].startswith("usage:")


def _logs(name: str) -> str:
    return docker("logs", name, check=False).stdout + docker("logs", name, check=False).stderr


def _phase(name: str, tag: str, timeout: float, server: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = docker("logs", name, check=False)
        for line in (out.stdout or "").splitlines():
            if line.startswith(tag + " "):
                return json.loads(line.split(" ", 1)[1])
        state = docker("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip()
        if state == "false" and tag not in (out.stdout or ""):
            break
        time.sleep(2)
    pytest.fail(f"{name}: no {tag} line: {_logs(name)[-3000:]}\nserver: {_logs(server)[-3000:]}", pytrace=False)


def test_rollout_server_container_serves_a_trainer_container_and_a_frozen_one_times_out(vllm_image, tmp_path):
    run = f"r1zero-vllm-{secrets.token_hex(3)}"
    net, srv, trainer = f"{run}-net", f"{run}-srv", f"{run}-trainer"
    policy = _policy(tmp_path / "policy")
    sync = tmp_path / "sync"
    sync.mkdir(mode=0o777)
    sync.chmod(0o777)
    key = secrets.token_hex(16)
    # /tmp as the pods' emptyDir: writable and exec (inductor loads the sampler ops it builds there)
    common = ["--network", net, "--user", f"{UID}:{UID}", "--read-only", "--tmpfs", "/tmp:exec", "--cap-drop", "ALL",
              "--security-opt", "no-new-privileges", "-e", "HOME=/tmp", "-e", "OMP_NUM_THREADS=1",
              "-e", f"R1ZERO_ROLLOUT_KEY={key}", "-v", f"{policy}:/policy:ro"]
    docker("network", "create", net)
    try:
        t0 = time.monotonic()
        # the StatefulSet's command (r1zero/cluster/rollout_manifests.py), here with a 1 GiB KV cache
        docker("run", "-d", "--name", srv, "--shm-size", "1g", *common, vllm_image,
               "python", "-m", "r1zero.grpo.vllm_rollout", "serve", "--model", "/policy", "--max-len", "128",
               "--dtype", "float32")  # fp32 as the trainer here: log-probs compared to 1e-4
        docker("run", "-d", "--name", trainer, *common, "-v", f"{CHECKS}:/checks.py:ro", "-v", f"{sync}:/sync",
               vllm_image, "python", "/checks.py", "/policy", f"{srv}:7100", "/sync")
        r = _phase(trainer, "PHASE1", 900, srv)
        print(f"server start + connect {time.monotonic() - t0:.0f} s, phase 1: {r}")
        assert "rollout server ready on" in _logs(srv) and r["probes"] == 3  # probes did not end it
        # the server samples from the weights the trainer pushed on connect, is stale after the
        # trainer's update, and follows the push
        assert r["gap_start"] < 1e-4, r
        assert r["gap_stale"] > 1e-2, r
        assert r["gap_pushed"] < 1e-4, r
        docker("pause", srv)  # a server that stops answering mid-run
        (sync / "go").touch()
        r2 = _phase(trainer, "PHASE2", 120, srv)
        print(f"push to a frozen server: {r2}")
        assert r2["error"] and "\n" not in r2["error"], r2
        assert "weight push timed out after 5 s (grpo.rollout.push_timeout_s)" in r2["error"], r2
        assert 4.5 < r2["s"] < 15, r2  # push_timeout_s 5 s, no hang
        code = docker("wait", trainer, timeout=60).stdout.strip()
        assert code == "0", _logs(trainer)[-3000:]
    finally:
        subprocess.run(["docker", "unpause", srv], capture_output=True)
        subprocess.run(["docker", "rm", "-f", srv, trainer], capture_output=True)
        subprocess.run(["docker", "network", "rm", net], capture_output=True)
