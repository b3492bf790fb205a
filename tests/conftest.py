"""Shared fixtures: a real S3-compatible server (moto in server mode) on loopback, free ports."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not come up")


@pytest.fixture(scope="session")
def wait_http():
    """``wait_http(url, timeout=30.0)``: poll until a server answers at ``url``, else RuntimeError.
    A fixture because --import-mode=importlib cannot import conftest helpers."""
    return _wait_http


class S3Server:
    """A moto S3 server process on 127.0.0.1; ``stop()``/``start()`` simulate an outage."""

    def __init__(self, port: int):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_http(self.endpoint + "/moto-api/")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


@pytest.fixture(scope="session")
def _s3_process():
    """One moto S3 server process for the whole session."""
    server = S3Server(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_server(_s3_process, monkeypatch):
    """The loopback S3 server, with endpoint and dummy credentials exported for boto3 and r1zero.

    Applied per test (monkeypatch), so nothing another test or an in-process CLI call did to the
    environment or to the store's settings can point this test at the wrong endpoint.
    """
    from r1zero import store

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "R1ZERO_S3_ENDPOINT": _s3_process.endpoint}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setattr(store, "_settings", store.S3Settings.from_env(retries=2))
    return _s3_process


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the loopback S3 server; returns its name."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3_server.client().create_bucket(Bucket=name)
    return name


# ---------------------------------------------------------------------------------------------
# tiny causal LMs for tests/test_generate.py and tests/grpo/test_update.py (EOS likely enough that some
# rows stop early). Fixtures, because --import-mode=importlib cannot import a helper module.

LM_EOS, LM_PAD = 1, 0


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=LM_EOS, pad_token_id=LM_PAD, bos_token_id=None, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight[LM_EOS] *= 0  # tied: also the EOS embedding
        m.model.norm.weight.fill_(1.0)
    return m


def _tiny_qwen2():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                      eos_token_id=LM_EOS, pad_token_id=LM_PAD, bos_token_id=None)
    return Qwen2ForCausalLM(cfg).eval()


def _tiny_r1zero_moe():
    import torch

    from r1zero.model import R1ZeroConfig, R1ZeroForCausalLM

    torch.manual_seed(2)
    cfg = R1ZeroConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, n_experts=4, num_experts_per_tok=2, n_shared=1, d_expert=16,
                       n_dense_layers=1, d_dense=48, eos_token_id=LM_EOS, pad_token_id=LM_PAD)
    return R1ZeroForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_lms():
    """Fresh-model builders: ``tiny_lms["qwen2"]()``, ``tiny_lms["r1zero_moe"]()``, ``tiny_lms["llama"]()``."""
    return {"llama": _tiny_llama, "qwen2": _tiny_qwen2, "r1zero_moe": _tiny_r1zero_moe}


# ---------------------------------------------------------------------------------------------
# container images (`make images`): built once per session, or reused when their inputs hash
# matches (r1zero.images.ensure_images). For any test that runs something in the images, e.g. the
# sandbox service in `runtime_image` as the manifests' uid (r1zero.images.UID).


@pytest.fixture(scope="session")
def images():
    """{"runtime": name, "train": name} of the built images. A missing Docker engine fails the
    test (CI must run the container tests), with the one-line reason."""
    from r1zero.errors import UserError
    from r1zero.images import ensure_images

    try:
        return ensure_images(log=lambda m: print(m, file=sys.stderr, flush=True))
    except UserError as err:
        pytest.fail(f"container tests need the built images: {err}", pytrace=False)


@pytest.fixture(scope="session")
def runtime_image(images):
    return images["runtime"]


@pytest.fixture(scope="session")
def train_image(images):
    return images["train"]


@pytest.fixture(scope="session")
def vllm_image():
    """The vLLM image (images/vllm.Dockerfile: rollout servers, GRPO trainers with vLLM rollouts),
    built once per session or reused when its inputs hash matches; no engine fails the test."""
    from r1zero.errors import UserError
    from r1zero.images import ensure_images

    try:
        return ensure_images(log=lambda m: print(m, file=sys.stderr, flush=True), only=("vllm",))["vllm"]
    except UserError as err:
        pytest.fail(f"container tests need the built vLLM image: {err}", pytrace=False)
