"""Layout parity on CPU/gloo against world 1, 20 steps: dp2 (FSDP2), tp2 (+SP), pp2 (1F1B), pp2 with
interleaved 1F1B (2 stages per rank, on a 4-layer model), ep2, and the 4-process dp4 x ep2,
tp2 x pp2 (also interleaved) and HSDP (2 replicas x 2 shards); each also in bf16; and resume across layouts.

The global batch is the same in every layout (dp splits it, grad_accum makes up the rest; pipeline
micro-batches are the grad_accum micro-batches), so fp32 layouts must reproduce the world=1 losses
within 1e-4 relative, and bf16 (FSDP2 ``MixedPrecisionPolicy``, fp32 reduction) within 2% of them,
with the compute dtype (the activations' dtype, ``summary.json``'s ``compute_dtype``) asserted.

Every run is ``r1zero pretrain`` through the real CLI under ``torchrun`` as a PyTorchJob pod starts
it; several runs share one launch (``parity_worker.py``: one interpreter start per rank, a fresh
process group per run). Resharding resume: the dp2 run checkpoints at step 10; tp2, pp2 and ep2 runs
start from a copy of that checkpoint, and their step-11 loss must equal the uninterrupted dp2
run's within 1e-5 relative; likewise dp2 from the interleaved pp2 run's step-10 checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from r1zero.train.dist import free_port
from r1zero.train.pretrain import run_pretrain

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
REL_TOL = 1e-4  # the bound; never loosen
BF16_TOL = 2e-2  # bf16 vs fp32 loss, the bound
RESUME_TOL = 1e-5  # next-step loss after a resharding resume, the bound

WORLD2 = {
    "dp2": "parallel.dp=2,pretrain.grad_accum=1,pretrain.checkpoint_every=10",
    "tp2": "parallel.tp=2,pretrain.grad_accum=2",
    "pp2": "parallel.pp=2,pretrain.grad_accum=2",
    # 4 layers: pp2 x 2 virtual stages of one layer each (rank 0: layers 0 and 2, rank 1: 1 and 3)
    "pp2i": "model.n_layers=4,parallel.pp=2,parallel.pp_schedule=interleaved_1f1b,pretrain.grad_accum=2,"
            "pretrain.checkpoint_every=10",
    "ep2": "parallel.dp=2,parallel.ep=2,pretrain.grad_accum=1",
}
WORLD4 = {
    "dp4ep2": "parallel.dp=4,parallel.ep=2,pretrain.grad_accum=1",
    "tp2pp2": "parallel.tp=2,parallel.pp=2,pretrain.grad_accum=4",
    # interleaved 1F1B with tensor + sequence parallelism inside each of the 4 one-layer stages
    "tp2pp2i": "model.n_layers=4,parallel.tp=2,parallel.pp=2,parallel.pp_schedule=interleaved_1f1b,"
               "pretrain.grad_accum=4",
    # HSDP: 2 replicas x 2 shards (fully_shard over the 2-D (dpr, dp_shard) mesh)
    "hsdp2x2": "parallel.dp=4,parallel.dp_replicate=2,pretrain.grad_accum=1",
}
BF16 = ",pretrain.precision=bf16"


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["value"] for r in rows if r["name"] == "train/loss"}


def _max_rel(ref: dict, got: dict) -> float:
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    return max(abs(ref[s] - got[s]) / abs(ref[s]) for s in ref)


@pytest.fixture(scope="module")
def setup(data_dir, make_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    cfg = make_config(pretrain={"steps": STEPS, "heldout_per_domain": 0, "log_every": 5, "checkpoint_every": 1000})
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    refs = {}
    # one intra-op thread, like the launched ranks (OMP_NUM_THREADS=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for ga, layers in ((2, 2), (4, 2), (2, 4), (4, 4)):
            out = root / f"ref-ga{ga}-L{layers}"
            summary = run_pretrain(cfg.model_copy(update={
                "pretrain": cfg.pretrain.model_copy(update={"grad_accum": ga}),
                "model": cfg.model.model_copy(update={"n_layers": layers})}), str(data_dir), str(out))
            assert summary["compute_dtype"] == "float32"
            refs[ga, layers] = _losses(out)
    finally:
        torch.set_num_threads(threads)
    return root, config, refs


def _launch(nproc: int, config: Path, data_dir: Path, out: Path, specs: dict[str, str], timeout: float):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(REPO / "tests" / "train" / "parity_worker.py"),
           str(config), str(data_dir), str(out), *[f"{k}:{v}" for k, v in specs.items()]]
    env = {**os.environ, "R1ZERO_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _check_layouts(out: Path, layouts: dict, refs: dict, world: int) -> dict:
    figures = {}
    for name, spec in layouts.items():
        ga = int(spec.split("pretrain.grad_accum=")[1].split(",")[0])
        dp = int(spec.split("parallel.dp=")[1].split(",")[0]) if "parallel.dp=" in spec else 1
        layers = int(spec.split("model.n_layers=")[1].split(",")[0]) if "model.n_layers=" in spec else 2
        ref = refs[ga * dp, layers]
        fp32 = json.loads((out / name / "summary.json").read_text())
        bf16 = json.loads((out / f"{name}-bf16" / "summary.json").read_text())
        assert fp32["world_size"] == bf16["world_size"] == world and fp32["engine"] == "fsdp2"
        assert fp32["compute_dtype"] == "float32" and bf16["compute_dtype"] == "bfloat16", (fp32, bf16)
        got32, got16 = _losses(out / name), _losses(out / f"{name}-bf16")
        assert got16 != got32  # bf16 really changed the arithmetic
        figures[name] = (_max_rel(ref, got32), _max_rel(ref, got16))
    print(f"world {world} max relative loss difference vs world=1 (fp32, bf16):", figures)
    assert all(f32 <= REL_TOL for f32, _ in figures.values()), figures
    assert all(f16 <= BF16_TOL for _, f16 in figures.values()), figures
    return figures


@pytest.mark.slow
def test_world2_layouts_match_world1_and_resume_across_layouts(setup, data_dir):
    root, config, refs = setup
    out = root / "w2"
    specs = {**WORLD2, **{f"{k}-bf16": v + BF16 for k, v in WORLD2.items()}}
    _launch(2, config, data_dir, out, specs, timeout=600)
    _check_layouts(out, WORLD2, refs, world=2)
    assert "2 pipeline stages per rank (interleaved 1F1B)" in json.loads((out / "pp2i" / "summary.json").read_text())["layout"]

    # resharding resume: the dp2 (FSDP2) checkpoint of step 10, loaded by tp2, pp2 and ep2; the
    # interleaved pp2 checkpoint loaded by dp2
    saved = out / "dp2" / "checkpoints" / "step-00000010"
    assert (saved / "engine" / ".metadata").is_file()
    assert sorted(p.name for p in (saved / "engine").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resume = {}
    for name in ("tp2", "pp2", "ep2"):
        ckpt = root / f"ckpt-{name}"
        shutil.copytree(saved, ckpt / saved.name)
        resume[f"{name}-from-dp2"] = f"{WORLD2[name]},pretrain.steps=11,pretrain.checkpoint_uri={ckpt}"
    # the interleaved pipeline's checkpoint (two stages per rank) loaded by dp2 (FSDP2), 4 layers
    ckpt = root / "ckpt-pp2i"
    shutil.copytree(out / "pp2i" / "checkpoints" / saved.name, ckpt / saved.name)
    resume["dp2-from-pp2i"] = ("model.n_layers=4,parallel.dp=2,pretrain.grad_accum=1,pretrain.steps=11,"
                               f"pretrain.checkpoint_uri={ckpt}")
    _launch(2, config, data_dir, out, resume, timeout=400)
    figures = {}
    for name in resume:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["start_step"] == 10 and summary["steps"] == 11
        uninterrupted = _losses(out / ("pp2i" if name.endswith("-from-pp2i") else "dp2"))
        figures[name] = abs(_losses(out / name)[11] - uninterrupted[11]) / uninterrupted[11]
    print("step-11 relative loss difference after resuming the dp2 and pp2i checkpoints:", figures)
    assert all(v <= RESUME_TOL for v in figures.values()), figures


@pytest.mark.slow
def test_world4_2d_layouts_match_world1(setup, data_dir):
    root, config, refs = setup
    out = root / "w4"
    specs = {**WORLD4, **{f"{k}-bf16": v + BF16 for k, v in WORLD4.items()}}
    _launch(4, config, data_dir, out, specs, timeout=600)
    _check_layouts(out, WORLD4, refs, world=4)
    # the exported model (one full tensor at a time from both pipeline stages) loads
    from r1zero.model import load_causal_lm

    model, _ = load_causal_lm(str(out / "tp2pp2"))
    assert model.config.num_hidden_layers == 2
