"""The MoE aux losses of the GRPO update count real tokens only (issue 16): padding added to a
batch changes neither the aux loss nor the update's gradients (router included), on the
replicated update (whole-batch and shared-prompt forwards) and on the micro-batched fsdp2 update;
the fsdp2 update's router z-loss term does not depend on ``grpo.micro_batch``."""

from __future__ import annotations

import copy

import pytest
import torch

import r1zero.grpo.update as U
from r1zero.config import GRPOConfig
from r1zero.grpo import sharded as S
from r1zero.model import R1ZeroConfig, R1ZeroForCausalLM

PAD = 0


def _policy(aux_coef: float = 0.1, z_coef: float = 0.01) -> R1ZeroForCausalLM:
    """Float64 (the router runs in fp32 either way), aux terms large enough to dominate a padding
    change: coefficients 10x the defaults."""
    torch.manual_seed(2)
    cfg = R1ZeroConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, n_experts=4, num_experts_per_tok=2, n_shared=1, d_expert=16,
                       n_dense_layers=0, eos_token_id=1, pad_token_id=PAD, aux_loss_coef=aux_coef,
                       z_loss_coef=z_coef)
    return R1ZeroForCausalLM(cfg).double()


def _rollout() -> tuple[U.Batch, torch.Tensor]:
    """3 groups of 4 completions, prompts of 3/5/7 tokens, completions of 1-9 tokens."""
    g = torch.Generator().manual_seed(1)
    prompts, comps = [], []
    for grp in range(3):
        p = torch.randint(2, 40, (3 + 2 * grp,), generator=g).tolist()
        for j in range(4):
            prompts.append(p)
            comps.append(torch.randint(2, 40, (1 + (grp * 4 + j * 3) % 9,), generator=g).tolist())
    return U.build_batch(prompts, comps, PAD), torch.randn(12, generator=g)


def _widen(b: U.Batch, left: int, right: int) -> U.Batch:
    """The same rollouts with ``left`` more prompt padding and ``right`` more completion padding."""
    B = b.input_ids_BL.shape[0]
    lp, rp = torch.full((B, left), PAD), torch.full((B, right), PAD)
    ids = torch.cat([lp, b.input_ids_BL, rp], 1)
    att = torch.cat([torch.zeros_like(lp), b.attention_BL, torch.zeros_like(rp)], 1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return U.Batch(ids, att, pos, torch.cat([b.targets_BT, rp], 1), torch.cat([b.mask_BT, torch.zeros(B, right)], 1),
                   b.prompt_len + left, b.prompt_first_U, b.prompt_src_B)


def _step(model, batch, adv, gcfg, micro_batch: int | None = None) -> dict[str, torch.Tensor]:
    """The parameters' change of one update with SGD(lr=1) and no clipping: minus the gradient."""
    m = copy.deepcopy(model)
    params = list(m.parameters())
    opt = torch.optim.SGD(params, lr=1.0)
    if micro_batch is None:
        U.policy_update(m, opt, batch, adv, gcfg, params=params, guard=U.NanGuard(3))
    else:
        S.sharded_policy_update(m, opt, batch, adv, gcfg, guard=U.NanGuard(3), micro_batch=micro_batch, dp=1)
    return {n: (p0 - p).detach() for (n, p0), p in zip(model.named_parameters(), m.parameters(), strict=True)}


def _assert_same_step(a: dict, b: dict, rel: float) -> None:
    for n, want in a.items():
        tol = rel * max(float(want.abs().max()), 1e-12)
        err = float((b[n] - want).abs().max())
        assert err <= tol, (n, err, tol)


GCFG = GRPOConfig(mu=1, lr=1.0, loss_agg="token", max_new_tokens=16, beta=0.0, grad_clip=0.0)


@pytest.mark.parametrize("shared", [True, False])
def test_padding_changes_neither_the_aux_loss_nor_the_replicated_update(shared, monkeypatch):
    """Whole-batch forward (``shared=False``) and the shared-prompt forward with length buckets:
    the aux loss of the padded batch and the update's gradients (router weights included) equal
    those of the same rollouts with 4 more prompt-padding and 5 more completion-padding columns."""
    torch.set_num_threads(1)
    monkeypatch.setattr(U, "SHARED_PROMPT_FORWARD", shared)
    model = _policy().train()
    batch, adv = _rollout()
    wide = _widen(batch, 4, 5)
    _, out = U.forward_completion(copy.deepcopy(model), batch)
    _, out_w = U.forward_completion(copy.deepcopy(model), wide)
    assert out.aux_loss.requires_grad
    torch.testing.assert_close(out_w.aux_loss, out.aux_loss, rtol=1e-6, atol=0)
    step, step_w = _step(model, batch, adv, GCFG), _step(model, wide, adv, GCFG)
    assert any(float(d.abs().max()) > 0 for n, d in step.items() if n.endswith("gate.weight"))
    _assert_same_step(step, step_w, 1e-5)


def test_padding_changes_neither_the_aux_loss_nor_the_fsdp2_update():
    """The micro-batched update of ``grpo.update_engine: fsdp2`` (its function, on the plain
    model at world 1): more padding, same gradients, for micro-batches of 5 (uneven) and 1."""
    torch.set_num_threads(1)
    model = _policy()
    batch, adv = _rollout()
    wide = _widen(batch, 4, 5)
    for mb in (5, 1):
        _assert_same_step(_step(model, batch, adv, GCFG, mb), _step(model, wide, adv, GCFG, mb), 1e-5)


def test_fsdp2_update_z_loss_term_does_not_depend_on_micro_batch():
    """With the router z-loss on (balance loss off, see below), micro-batches of 12 (the whole
    batch), 5 and 1 give the same step up to the fp32 router's rounding (1e-5 of the largest
    change): each micro-batch's z-loss is weighted by its share of the real tokens.

    The Switch balance loss (``E * sum_e f_e * P_e``, a product of two means over the forward's
    tokens) is not additive over micro-batches: like pretraining's micro-batches and the
    data-parallel ranks, each micro-batch balances its own tokens (micro-batch-level balance), so
    it is left out of this comparison."""
    torch.set_num_threads(1)
    model = _policy(aux_coef=0.0, z_coef=0.1)
    batch, adv = _rollout()
    whole = _step(model, batch, adv, GCFG, 12)
    assert float(whole["model.layers.0.mlp.gate.weight"].abs().max()) > 0
    for mb in (5, 1):
        _assert_same_step(whole, _step(model, batch, adv, GCFG, mb), 1e-5)
