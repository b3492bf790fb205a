"""The sharded GRPO update's startup (r1zero.grpo.sharded.ShardedGRPO, fill_from_rank0): only rank
0 reads the policy's weights, the shards of every rank equal the checkpoint's tensors exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1zero.model import load_causal_lm
from r1zero.train.dist import free_port

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "grpo" / "sharded_load_worker.py"
SIZES = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_experts": 4, "d_expert": 16}


def _worker():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import sharded_load_worker as W
    finally:
        sys.path.pop(0)
    return W


def _policy_dir(root: Path) -> Path:
    """A standard (Glm4Moe: sigmoid router with its selection bias, a shared expert, 4 routed) checkpoint of the worker's policy."""
    from r1zero.model import build_model

    cfg = _worker().config(1, SIZES)
    model = build_model(cfg.model, seed=cfg.seed)
    with torch.no_grad():  # non-zero router biases: the buffers travel too
        for name, b in model.named_buffers():
            if name.endswith("expert_bias_E"):
                b.copy_(torch.linspace(-0.1, 0.1, b.numel()))
    model.save_pretrained(str(root / "policy"))
    return root / "policy"


def _launch(out: Path, model_dir: Path, ep: int, precision: str = "fp32") -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(WORKER), str(out), str(model_dir), str(ep),
           json.dumps({**SIZES, "precision": precision})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "R1ZERO_PROGRESS": "0"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("ep,precision", [(1, "fp32"), (2, "fp32"), (2, "bf16")])
def test_world2_shards_equal_the_checkpoint_with_rank0_reading_it(tmp_path, ep, precision):
    """torchrun world 2, FSDP2 (ep=1) and FSDP2 + EP (ep=2, experts on their own mesh): rank 1
    passes the policy on meta; every tensor of the policy and the reference (parameters and the
    routers' biases) that a rank holds, gathered, equals the checkpoint's (the world-1 load
    through the HF-name mapping) bit for bit, and together the ranks hold all of them. bf16: the
    policy keeps fp32 master weights, the reference holds the checkpoint rounded to bf16."""
    model_dir = _policy_dir(tmp_path)
    want = {k: v for k, v in load_causal_lm(str(model_dir), require_tokenizer=False)[0].state_dict().items()}
    assert any(k.endswith("expert_bias_E") and v.abs().sum() > 0 for k, v in want.items())
    _launch(tmp_path / "out", model_dir, ep, precision)
    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["fsdp"] for r in ranks)
    experts = [{k for k in r["policy"] if ".experts." in k} for r in ranks]
    if ep == 2:  # each rank holds its own half of the routed experts
        assert experts[0] and experts[1] and not experts[0] & experts[1]
    for which in ("policy", "reference"):
        got: dict[str, torch.Tensor] = {}
        for r in ranks:
            for k, v in r[which].items():
                if k in got:
                    assert torch.equal(got[k], v), (which, k)
                got[k] = v
        assert set(got) == set(want), (which, sorted(set(got) ^ set(want))[:4])
        low = which == "reference" and precision == "bf16"
        for k, v in want.items():
            # the selection bias stays fp32 in a bf16 reference: routing on a rounded bias
            # (-0.1001 for -0.1) would pick other experts than the policy near ties
            expect = v.to(torch.bfloat16) if low and not k.endswith("expert_bias_E") else v
            assert got[k].dtype == expect.dtype and torch.equal(got[k], expect), (which, k)


@pytest.mark.slow
def test_world2_grpo_adamw_has_one_group_per_mesh_and_steps_as_the_per_parameter_loop(tmp_path):
    """FSDP2 + EP at world 2 (experts on the edp mesh, the rest on dp): r1zero.grpo.sharded's AdamW
    holds one foreach group per mesh (r1zero.train.engine.by_mesh) and 3 steps on fixed gradients
    give the per-parameter AdamW's shards (allclose 1e-7; measured: equal)."""
    _launch(tmp_path / "out", _policy_dir(tmp_path), 2)
    for r in (0, 1):
        opt = torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False)["optimizer"]
        assert opt["meshes"] == 2 and opt["groups"] == 2, opt
        assert opt["group_meshes"] == [1, 1] and opt["foreach"] == [True, True], opt
        assert opt["moved"] > 1e-4  # the steps changed the weights
        assert opt["max_diff"] <= 1e-7, opt


def test_weights_false_loads_the_same_model_on_meta(tmp_path):
    """``load_causal_lm(..., weights=False)``: the same class, config and state-dict names, on meta."""
    model_dir = _policy_dir(tmp_path)
    full, _ = load_causal_lm(str(model_dir), require_tokenizer=False)
    meta, _ = load_causal_lm(str(model_dir), require_tokenizer=False, weights=False)
    assert type(meta) is type(full) and meta.config.to_dict() == full.config.to_dict()
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert all(p.is_meta for p in meta.parameters())


def test_a_rank0_dict_without_a_tensor_is_refused(tmp_path):
    """fill_from_rank0 names a tensor the sharded model holds and rank 0's dict lacks (world 1,
    the trainer's one-rank group) instead of leaving it at its random initial value."""
    from r1zero.grpo import sharded as S

    model_dir = _policy_dir(tmp_path)
    policy, _ = load_causal_lm(str(model_dir), require_tokenizer=False)
    sd = policy.state_dict()
    sd.pop("model.norm.weight")
    target, _ = load_causal_lm(str(model_dir), require_tokenizer=False)
    with pytest.raises(RuntimeError, match="model.norm.weight"):
        S.fill_from_rank0(target, sd)
