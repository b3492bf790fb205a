"""policy_update: world 2 (gloo, two processes) == world 1 on the same global batch; NaN guard."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r1zero.config import GRPOConfig
from r1zero.grpo.advantages import advantages
from r1zero.grpo.update import RL_BETAS, NanGuard, build_batch, make_optimizer, policy_update


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=1, pad_token_id=0, bos_token_id=None)
    return LlamaForCausalLM(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    prompts, comps, groups, rewards = [], [], [], []
    for grp in range(4):  # 4 groups of 3, variable lengths
        p = torch.randint(2, 32, (3 + grp,), generator=g).tolist()
        for j in range(3):
            prompts.append(p)
            comps.append(torch.randint(2, 32, (2 + (grp * 3 + j) % 5,), generator=g).tolist())
            groups.append(grp)
            rewards.append(float((grp + j) % 2))
    return prompts, comps, torch.tensor(groups), torch.tensor(rewards)


def _run(rank: int, world: int, port: int, aggs: tuple, out: dict | None):
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    res = {agg: _update_once(rank, world, agg) for agg in aggs}
    if world > 1:
        if rank == 0:
            torch.save(res, out["path"])
        dist.barrier()
        dist.destroy_process_group()
        return None
    return res


def _update_once(rank: int, world: int, agg: str) -> dict:
    model = _model()
    cfg = GRPOConfig(mu=2, lr=1.0, loss_agg=agg, max_new_tokens=8, eps_low=0.2, eps_high=0.28)
    prompts, comps, groups, rewards = _batch()
    adv = advantages(rewards, groups, "group")
    per = len(prompts) // world
    sl = slice(rank * per, (rank + 1) * per)
    batch = build_batch(prompts[sl], comps[sl], 0)
    params = list(model.parameters())
    # plain SGD: the comparison is about the (all-reduced) gradient; Adam would amplify float-order
    # noise in near-zero gradients (g / sqrt(v)) into visible parameter differences
    opt = torch.optim.SGD(params, lr=cfg.lr)
    with torch.no_grad():
        from r1zero.grpo.update import sequence_logprobs

        old = sequence_logprobs(model, batch)
    stats = policy_update(model, opt, batch, adv[sl], cfg, params=params, guard=NanGuard(3), old_logp_BT=old)
    vec = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return {"vec": vec, "stats": stats}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


AGGS = ("token", "sequence", "constant")


@pytest.mark.slow
def test_world2_update_equals_world1(tmp_path):
    ones = _run(0, 1, 0, AGGS, None)
    path = str(tmp_path / "w2.pt")
    mp.spawn(_run, args=(2, _free_port(), AGGS, {"path": path}), nprocs=2, join=True)
    twos = torch.load(path)
    for agg in AGGS:
        _compare(ones[agg], twos[agg])


def _compare(one: dict, two: dict) -> None:
    moved = (one["vec"] - torch.nn.utils.parameters_to_vector(_model().parameters()).detach()).abs().max()
    assert moved > 1e-3, "the update must be non-trivial for the comparison to mean anything"
    assert torch.allclose(one["vec"], two["vec"], atol=1e-6, rtol=0), float((one["vec"] - two["vec"]).abs().max())
    for k in ("tokens", "clip_low", "clip_high", "loss", "grad_norm"):
        assert two["stats"][k] == pytest.approx(one["stats"][k], rel=1e-5, abs=1e-7), k
    assert one["stats"]["clip_low"] + one["stats"]["clip_high"] > 0  # second inner step is off-policy and clips


def test_nan_guard_skips_then_aborts():
    model = _model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    prompts, comps, groups, rewards = _batch()
    batch = build_batch(prompts, comps, 0)
    cfg = GRPOConfig(mu=1, lr=1e-2, max_new_tokens=8)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    guard = NanGuard(abort_after=2)
    adv = advantages(rewards, groups, "group")
    st = policy_update(model, opt, batch, adv, cfg, params=params, guard=guard)
    assert st["skipped"] == 1 and guard.total == 1
    after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    assert torch.equal(torch.isnan(after), torch.isnan(before))
    assert torch.equal(after[~torch.isnan(after)], before[~torch.isnan(before)])  # no step was taken
    with pytest.raises(RuntimeError, match="2 consecutive non-finite"):
        policy_update(model, opt, batch, adv, cfg, params=params, guard=guard)
    g2 = NanGuard(2)
    assert g2.ok(1.0) and not g2.ok(float("inf")) and g2.ok(0.5) and g2.in_a_row == 0 and g2.total == 1


def test_make_optimizer_is_fused_adamw_matching_the_loop_implementation():
    torch.manual_seed(0)
    w = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in w]
    init = [p.detach().clone() for p in w]
    opt = make_optimizer(w, 1e-2)
    loop = torch.optim.AdamW(ref, lr=1e-2, betas=RL_BETAS, weight_decay=0.0, foreach=False)
    assert opt.defaults["fused"] and opt.defaults["betas"] == RL_BETAS and opt.defaults["weight_decay"] == 0.0
    for step in range(5):
        for ps, o in ((w, opt), (ref, loop)):
            o.zero_grad()
            ((ps[0] * (step + 1)).sin().sum() + ps[1].square().sum()).backward()
            o.step()
    for a, b, a0 in zip(w, ref, init):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a - a0).abs().max() > 1e-2  # it did train


def test_make_optimizer_falls_back_off_fused_for_unsupported_dtypes():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64).to(torch.complex64))
    assert not make_optimizer([p], 1e-3).defaults["fused"]


def test_batch_moves_every_tensor_to_the_model_device_and_collectives_stay_on_cpu_with_gloo():
    """Batches are built on CPU and moved once, whole, to the policy's device (a GPU node); the
    small collective tensors follow the backend (CPU for gloo, CUDA for NCCL)."""
    import dataclasses

    from r1zero.grpo.update import Batch, collective_device

    batch = build_batch([[5, 6, 7], [5, 6, 7], [8, 9]], [[1, 2], [3], [4, 4, 4]], 0)
    assert batch.to(torch.device("cpu")) is batch  # already there: no copy
    moved = batch.to(torch.device("meta"))
    for f in dataclasses.fields(Batch):
        v = getattr(moved, f.name)
        if torch.is_tensor(getattr(batch, f.name)):
            assert v.device.type == "meta", f.name
        else:
            assert v == getattr(batch, f.name), f.name
    assert collective_device().type == "cpu"  # no process group (and gloo in the world-2 test)


# ---------------------------------------------------------------------------------------------
# the shared-prompt forward (each unique prompt once, completions in length buckets from its
# cache: the model's own forward) against one model(...) forward over the padded batch

_EOS, _PAD = 1, 0  # of the tiny LMs in tests/conftest.py


def test_shared_prompt_forward_matches_generic_update(tiny_lms, monkeypatch):
    """policy_update with the shared-prompt forward == with one model(...) forward (transformers'
    Llama through its own forward and DynamicCache)."""
    import copy

    import r1zero.grpo.update as U

    m0 = copy.deepcopy(tiny_lms["llama"]())
    m0.model.embed_tokens.padding_idx = _PAD  # as in transformers' Llama: no lookup gradient into the pad row
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    rows = [p for p in prompts for _ in range(3)]
    # varying lengths (right padding) and PAD/EOS sampled as real tokens in the completions
    comps = [[4, _PAD, 6, _EOS], [7, 8], [9], [_PAD, 3, 2, 2, 5], [6, _EOS], [2, 2, 2], [8, 9, 10], [3], [_EOS]]
    batch = U.build_batch(rows, comps, _PAD)
    assert batch.prompt_src_B.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert U._shares_prompts(m0.train())
    cfg = GRPOConfig(group_size=3, max_new_tokens=5, beta=0.0, mu=2, loss_agg="token", lr=1e-2)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.2, -0.5, 1.0, 0.0, -1.0])
    res = {}
    for shared in (True, False):
        monkeypatch.setattr(U, "SHARED_PROMPT_FORWARD", shared)
        m = copy.deepcopy(m0)
        params = list(m.parameters())
        # SGD: the parameters then differ by lr x the gradients' difference (AdamW's m/sqrt(v)
        # would turn float rounding on a near-zero gradient into a full lr-sized step)
        opt = torch.optim.SGD(params, lr=cfg.lr)
        logp = U.sequence_logprobs(m, batch)
        stats = U.policy_update(m, opt, batch, adv, cfg, params=params, guard=U.NanGuard(3))
        res[shared] = (logp, stats, [p.detach().clone() for p in params])
    real = batch.mask_BT.bool()  # padding positions are masked out everywhere downstream
    torch.testing.assert_close(res[True][0][real], res[False][0][real], atol=1e-5, rtol=1e-5)
    for k in ("loss", "grad_norm", "entropy_sum", "tokens"):
        assert res[True][1][k] == pytest.approx(res[False][1][k], rel=1e-5, abs=1e-6), k
    for a, b in zip(res[True][2], res[False][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["ragged", "short", "equal", "empty"])
def test_shared_prompt_forward_for_r1zero_moe(tiny_lms, monkeypatch, case):
    """r1zero's dropless MoE: the shared-prompt forward gives the generic forward's logits and
    policy-gradient gradients for ragged, one-token, equal-length and empty completions; the MoE
    sees each unique prompt once (U x P prompt tokens, not B x P); the aux loss still trains the
    router; a capacity factor (dropping depends on the batch) takes the generic path."""
    import copy

    import r1zero.grpo.update as U
    from r1zero.model.moe import MoELayer

    m0 = tiny_lms["r1zero_moe"]().train()
    seen: list[int] = []
    fwd = MoELayer.forward

    def counting(self, x, *args, **kwargs):
        seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        return fwd(self, x, *args, **kwargs)

    monkeypatch.setattr(MoELayer, "forward", counting)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    rows = [p for p in prompts for _ in range(3)]
    comps = {
        "ragged": [[4, 6, 6, _EOS], [7, 8], [9], [3, 3, 2, 2, 5], [6, _EOS], [2, 2, 2], [8, 9, 10], [3], [_EOS]],
        "short": [[4], [7], [9], [], [6], [_EOS], [3], [3], [2]],
        "equal": [[4, 6, 6], [7, 8, 1], [9, 9, 9], [3, 3, 2], [6, 1, 1], [2, 2, 2], [1, 2, 3], [3, 2, 1], [4, 4, 4]],
        "empty": [[]] * 9,
    }[case]
    batch = U.build_batch(rows, comps, _PAD)
    real = batch.mask_BT.bool()
    adv_B1 = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.2, -0.5, 1.0, 0.0, -1.0])[:, None]
    res = {}
    for shared in (True, False):
        monkeypatch.setattr(U, "SHARED_PROMPT_FORWARD", shared)
        m = copy.deepcopy(m0)
        seen.clear()
        logits_NV, out = U.forward_completion(m, batch)
        assert logits_NV.shape[0] == int(real.sum())  # real positions only, row-major
        res[shared] = [list(seen), out.aux_loss]
        if not real.any():
            continue
        logp_N = torch.log_softmax(logits_NV, -1).gather(-1, batch.targets_BT[real][:, None])[:, 0]
        (-(logp_N * adv_B1.expand_as(real)[real]).sum()).backward()
        res[shared] += [logp_N.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                          for p in m.parameters()]]
    if real.any():
        torch.testing.assert_close(res[True][2], res[False][2], atol=1e-5, rtol=1e-5)
        for a, b in zip(res[True][3], res[False][3]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert res[True][0][0] == len(prompts) * batch.prompt_len  # unique prompt tokens, once
    assert sum(res[True][0]) < sum(res[False][0]) == len(rows) * batch.input_ids_BL.shape[1]
    assert res[True][1] is not None and res[True][1].requires_grad  # the balance loss still trains the router
    m_cap = copy.deepcopy(m0)
    for moe in m_cap.moe_layers():
        moe.capacity_factor = 1.0
    assert not U._shares_prompts(m_cap)


def test_length_buckets_cover_each_row_once_and_cut_padded_work():
    from r1zero.grpo.update import _BUCKET_GAIN, _length_buckets

    lens = torch.tensor([1, 9, 2, 0, 9, 3, 8, 1])
    B, S, P = lens.numel(), 9, 5
    buckets = _length_buckets(lens, S, P)
    assert 1 < len(buckets) <= 4
    assert sum(r.numel() * w * (P + w) for r, w in buckets) <= _BUCKET_GAIN * B * S * (P + S)
    covered = [int(r) for rows, _ in buckets for r in rows]
    assert len(covered) == len(set(covered))  # each row in one bucket at most
    assert {i for i in range(B) if lens[i] > 0} <= set(covered)  # a row with no input may be left out
    for rows, w in buckets:
        assert w == int(lens[rows].max())
    near = torch.tensor([9, 9, 9, 9, 9, 9, 9, 8])  # splitting would not pay: one padded block
    assert [(r.tolist(), w) for r, w in _length_buckets(near, S, P)] == [(list(range(B)), S)]
    assert _length_buckets(torch.zeros(4, dtype=torch.long), 0, P) == []
