"""Fixtures for the pretraining tests: a tiny data artifact in the agreed layout, tiny configs.

The artifact (``manifest.json``, ``tokenizer.json``, ``train/``/``eval/`` parquet shards with the
agreed row schema) is written here directly so these tests do not depend on the data stage; a
byte-level BPE with the R1-Zero special tokens is trained on its text with HF ``tokenizers``.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1zero.config import build_config

REPO = Path(__file__).resolve().parents[2]
SPECIALS = ["<|endoftext|>", "<|pad|>", "<think>", "</think>", "<answer>", "</answer>"]


def _rows(n: int, seed: int, split: str) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 3
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if kind == 0:
            rows.append(dict(id=f"{split}-m{i}", domain="math", prompt=f"What is {a} + {b}?", answer=str(a + b),
                             solution=f"{a} + {b} = {a + b}.", difficulty=1, source="fixture", meta="{}"))
        elif kind == 1:
            src = f"def f(x):\n    return x * {a}"
            rows.append(dict(id=f"{split}-c{i}", domain="code", prompt=f"{src}\nWhat is f({b})?",
                             answer=str(a * b), solution=f"f({b}) = {b} * {a} = {a * b}.", difficulty=1,
                             source="fixture",
                             meta=json.dumps({"kind": "predict_output", "source": src, "func": "f", "input": b,
                                              "output": a * b})))
        else:
            rows.append(dict(id=f"{split}-g{i}", domain="general", prompt=f"The number {a} is less than {a + b + 1}.",
                             answer="", solution="", difficulty=1, source="fixture", meta="{}"))
    return rows


def write_data_artifact(root: Path, n_train: int = 240, n_eval: int = 30, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": _rows(n_train, seed, "train"), "eval": _rows(n_eval, seed + 1, "eval")}
    for split, rows in splits.items():
        (root / split).mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / split / "part-00000.parquet")
    (root / "quarantine").mkdir(exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [r["prompt"] + " " + r["solution"] + " " + r["answer"] for r in splits["train"]]
    texts.append("A conversation between User and Assistant. The Assistant thinks in answers in\nUser:")
    tok.train_from_iterator(texts, trainer)
    tok.save(str(root / "tokenizer.json"))
    (root / "manifest.json").write_text(json.dumps({"splits": {k: len(v) for k, v in splits.items()}}))
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return write_data_artifact(tmp_path_factory.mktemp("data"))


def tiny_config(**sections):
    """A seconds-scale config: d_model 64, 2 layers, 4 experts top-2, seq 32, fp32."""
    tree = {
        "name": "t", "seed": 0,
        "model": {"vocab_size": 320, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64,
                  "moe": {"n_experts": 4, "top_k": 2, "n_shared": 1, "d_expert": 32}},
        "pretrain": {"steps": 6, "seq_len": 32, "micro_batch": 4, "grad_accum": 1, "lr": 3e-3, "warmup_steps": 2,
                     "log_every": 2, "checkpoint_every": 100, "heldout_per_domain": 4, "heldout_max_new_tokens": 8},
        "telemetry": {"enabled": False},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return build_config(tree)


def run_torchrun(nproc: int, args: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m r1zero.cli ...`` on loopback with a free port."""
    from r1zero.train.dist import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "r1zero.cli", *args]
    env = {**__import__("os").environ, "R1ZERO_PROGRESS": "0", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def make_config():
    """``make_config(pretrain={...}, parallel={...})`` -> a tiny validated Config."""
    return tiny_config


@pytest.fixture(scope="session")
def torchrun():
    return run_torchrun
