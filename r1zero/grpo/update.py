"""One policy update from scored rollouts, data-parallel over torch.distributed ranks.

    stats = policy_update(model, optimizer, batch, adv_B, gcfg, ref_model=None)

Each rank holds whole groups. The loss is ``sum over local tokens / global denominator``: the
aggregation denominator (token count, sequence count or N*L_max, see
:func:`r1zero.grpo.losses.aggregate`) is all-reduced first and gradients are all-reduced with SUM,
so N ranks produce exactly the update that one process makes on the same global batch (up to
float summation order). ``mu`` inner iterations reuse the rollout log-probs as pi_old
(DeepSeekMath Alg. 1); with ``mu == 1`` pi_old is the detached current policy (ratio 1, as in TRL).

:class:`NanGuard` skips an update whose loss or gradient norm is not finite, counts it, and aborts
after ``grpo.nan_abort_after`` in a row.

Legend: B = completions, L = prompt+completion length, T = completion length, V = vocab,
N = real (unpadded) completion tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1zero.generate import left_pad
from r1zero.grpo.losses import entropy_of, log_probs, pick, policy_loss, token_logprobs
from r1zero.grpo.ppo import value_loss


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where small collective tensors live: NCCL only reduces CUDA tensors, gloo CPU ones."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Sum a list of floats over ranks (float64)."""
    if world()[1] == 1:
        return list(values)
    from r1zero.train import dist as rdist

    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    return rdist.all_reduce(t).tolist()


@dataclass
class Batch:
    input_ids_BL: torch.Tensor
    attention_BL: torch.Tensor
    position_BL: torch.Tensor
    targets_BT: torch.Tensor
    mask_BT: torch.Tensor
    prompt_len: int
    # row of the first occurrence of each unique prompt (U,) and each row's unique prompt (B,):
    # lets :func:`forward_completion` run a prompt shared by G completions once
    prompt_first_U: torch.Tensor | None = None
    prompt_src_B: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        """This batch on ``device`` (itself when already there): built on CPU, used by the model."""
        if self.input_ids_BL.device == torch.device(device):
            return self
        mv = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in mv.items()})


def build_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> Batch:
    """Left-padded prompts + right-padded completions in one tensor."""
    uniq: dict[tuple, int] = {}
    first, src = [], []
    for i, p in enumerate(prompt_ids):
        k = tuple(p)
        if k not in uniq:
            uniq[k] = len(uniq)
            first.append(i)
        src.append(uniq[k])
    p_BL, pm_BL = left_pad(prompt_ids, pad_id)
    T = max(1, max((len(c) for c in completion_ids), default=1))
    c_BT = torch.tensor([list(c) + [pad_id] * (T - len(c)) for c in completion_ids], dtype=torch.long)
    cm_BT = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completion_ids], dtype=torch.long)
    ids = torch.cat([p_BL, c_BT], 1)
    att = torch.cat([pm_BL, cm_BT], 1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    shared = all(len(p) > 0 for p in prompt_ids)
    return Batch(ids, att, pos, c_BT, cm_BT.float(), p_BL.shape[1],
                 torch.tensor(first, dtype=torch.long) if shared else None,
                 torch.tensor(src, dtype=torch.long) if shared else None)


# Run each unique prompt once (its cache shared by its G completions) where the model allows it.
SHARED_PROMPT_FORWARD = True

# Completion rows run in up to this many length-sorted buckets (each its own forward from the
# shared prompt cache) when that cuts the padded completion work (queries x keys) to at most
# _BUCKET_GAIN of one padded block: each bucket is one more forward call, so small gains do not pay.
_MAX_BUCKETS = 4
_BUCKET_GAIN = 0.75


@dataclass
class _Output:
    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None
    aux_tokens: float | None = None  # the real tokens the aux loss is the mean over


def aux_tokens(out, batch: Batch) -> float:
    """The number of real tokens that the MoE aux loss of ``forward_completion(model, batch)``
    (its output ``out``) averages over: the shared-prompt forward reports it; one forward over the
    padded batch counts its attention mask's tokens (r1zero's MoE layer skips padding)."""
    n = getattr(out, "aux_tokens", None)
    return float(batch.attention_BL.sum()) if n is None else float(n)


def forward_completion(model, batch: Batch, temperature: float = 1.0):
    """(logits_NV of the N real completion tokens, row-major over ``batch.mask_BT``, divided by
    the sampling ``temperature``; model output).

    Completions were drawn from ``softmax(logits / T)``, so the ratio, KL and entropy must use the
    same distribution, or T != 1 trains a different policy than the one sampled (TRL does the same).
    Only real positions are returned: padding carries no loss.

    Every path is the model's own forward. Where :func:`_shares_prompts` allows, each unique
    prompt runs once and its keys/values (a transformers ``DynamicCache``, autograd through it)
    are shared by its G completions, which run in length buckets (:func:`_length_buckets`): the
    same logits up to float rounding and the same gradient (tests/grpo/test_update.py);
    otherwise one ``model(...)`` over the whole padded batch.
    """
    batch = batch.to(_device(model))
    T = batch.targets_BT.shape[1]
    real_BT = batch.mask_BT.bool()
    if SHARED_PROMPT_FORWARD and batch.prompt_src_B is not None and _shares_prompts(model):
        logits_NV, aux, n_aux = _shared_prompt_forward(model, batch, real_BT)
        return _tempered(logits_NV, temperature), _Output(logits_NV, aux, n_aux)
    kw = {"use_cache": False}
    if _accepts_keep(model):
        kw["logits_to_keep"] = T + 1
    out = model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_BL, position_ids=batch.position_BL, **kw)
    return _tempered(out.logits[:, -(T + 1):-1][real_BT], temperature), out


def _shares_prompts(model) -> bool:
    """Whether a prompt forward + completion forwards from its cache equal one forward over the
    batch: r1zero's model or a transformers causal LM taking a cache, without gradient
    checkpointing (no cache then), dropout (prompt noise would be shared by the group), or a MoE
    capacity factor / expert parallelism (which tokens drop depends on the batch's composition),
    or forward hooks (a hook, e.g. PPO's value head on ``lm_head``, expects one forward over the
    padded batch)."""
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return False
    ckpt = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"  # transformers 5 deprecates the second name
    if getattr(model, ckpt, False):
        return False
    mod = type(model).__module__
    if mod.startswith("r1zero.model"):
        return all(m.capacity_factor is None and m.ep_dispatch is None for m in model.moe_layers())
    if not mod.startswith("transformers."):
        return False
    cfg = model.config
    return not (model.training and any(float(getattr(cfg, a, 0.0) or 0.0) > 0 for a in
                                       ("attention_dropout", "hidden_dropout", "dropout", "mlp_dropout",
                                        "resid_pdrop", "attn_pdrop", "embd_pdrop")))


def _length_buckets(len_B: torch.Tensor, width: int, prompt_len: int) -> list[tuple[torch.Tensor, int]]:
    """(rows, width) groups of completion rows: one padded block, or up to ``_MAX_BUCKETS`` of
    rows sorted by length when that cuts the (queries x keys) work to ``_BUCKET_GAIN`` of it.
    Rows with no completion input (width 0) are left out."""
    B = len_B.shape[0]
    whole = [(torch.arange(B, device=len_B.device), width)]
    order = torch.sort(len_B, stable=True).indices
    chunks = [c for c in order.tensor_split(min(_MAX_BUCKETS, B)) if c.numel()]
    split = [(c, int(len_B[c].max())) for c in chunks]
    split = [(c, w) for c, w in split if w > 0]
    P = prompt_len
    if sum(c.numel() * w * (P + w) for c, w in split) <= _BUCKET_GAIN * B * width * (P + width):
        return split
    return whole if width > 0 else []


def _cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _shared_prompt_forward(model, batch: Batch, real_BT: torch.Tensor):
    """(logits_NV, aux loss, its real tokens) of :func:`forward_completion` from one forward over the U unique
    prompts and one forward per length bucket of completions, each from the prompt cache's rows.

    Completion input t (right-padded, S = T - 1 per row) predicts token t + 1; token 0 is predicted
    from the prompt's last position. The aux loss of r1zero's MoE is the mean of the forwards',
    weighted by their real tokens (each forward's attention mask marks them; the MoE layer counts
    only those: each unique prompt token once, padding never).
    """
    from transformers import DynamicCache

    P, first_U, src_B = batch.prompt_len, batch.prompt_first_U, batch.prompt_src_B
    B, T = real_BT.shape
    S = T - 1
    dev = real_BT.device
    ids_UP = batch.input_ids_BL.index_select(0, first_U)[:, :P]
    att_UP = batch.attention_BL.index_select(0, first_U)[:, :P]
    pos_UP = batch.position_BL.index_select(0, first_U)[:, :P]
    ckw = _cache_kw(model)
    keep = {"logits_to_keep": 1} if _accepts_keep(model) else {}
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids_UP, attention_mask=att_UP, position_ids=pos_UP, use_cache=True, **{ckw: cache}, **keep)
    # r1zero's model fills the cache passed in (returning none in training mode); transformers'
    # models return it
    got = getattr(out, ckw, None)
    got = cache if got is None else got
    kv = [(layer.keys, layer.values) for layer in got.layers]
    parts = [out.logits[:, -1].index_select(0, src_B)]  # (B, V): predicts completion token 0
    auxes = [(out.aux_loss, float(att_UP.sum()))] if getattr(out, "aux_loss", None) is not None else []
    idx_BT = torch.zeros((B, T), dtype=torch.long, device=dev)
    idx_BT[:, 0] = torch.arange(B, device=dev)
    n_done = B
    keep_BS = real_BT[:, 1:]  # completion input t is needed iff token t + 1 is real
    for rows, w in _length_buckets(keep_BS.sum(1), S, P):
        src = src_B.index_select(0, rows)
        c = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(kv):
            c.update(k.index_select(0, src), v.index_select(0, src), i)
        ids = batch.input_ids_BL.index_select(0, rows)[:, P:P + w]
        # padded completion inputs marked as such (only for the MoE aux statistics: right padding
        # comes after every real token, so no real query sees it either way)
        real_bw = real_BT.index_select(0, rows)[:, :w]
        att = torch.cat([att_UP.index_select(0, src), real_bw.to(att_UP.dtype)], 1)
        pos = batch.position_BL.index_select(0, rows)[:, P:P + w]
        o = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True, **{ckw: c})
        k_bw = keep_BS.index_select(0, rows)[:, :w]
        parts.append(o.logits[k_bw])
        # where each kept slot landed in the concatenation of parts
        slot_bw = torch.zeros(k_bw.shape, dtype=torch.long, device=dev)
        slot_bw[k_bw] = n_done + torch.arange(int(k_bw.sum()), device=dev)
        idx_BT[rows, 1:w + 1] = slot_bw
        n_done += int(k_bw.sum())
        if getattr(o, "aux_loss", None) is not None:
            auxes.append((o.aux_loss, float(real_bw.sum())))
    logits_NV = torch.cat(parts).index_select(0, idx_BT[real_BT])
    aux, n_aux = None, sum(n for _, n in auxes)
    if model.training and auxes:
        aux = sum(a * n for a, n in auxes) / max(n_aux, 1.0)
    return logits_NV, aux, n_aux


def unpack(values_N: torch.Tensor, real_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) tensor with ``values_N`` at the real positions (row-major) and 0 at padding."""
    return values_N.new_zeros(real_BT.shape).masked_scatter(real_BT, values_N)


def _accepts_keep(model) -> bool:
    import inspect

    cls = type(model)
    if cls not in _KEEP:
        _KEEP[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return _KEEP[cls]


_KEEP: dict[type, bool] = {}


@torch.no_grad()
def sequence_logprobs(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs (B, T) of the completions under ``model`` at the sampling ``temperature``
    (0 at padding)."""
    was = model.training
    model.eval()
    try:
        batch = batch.to(_device(model))
        logits_NV, _ = forward_completion(model, batch, temperature)
        real_BT = batch.mask_BT.bool()
        return unpack(token_logprobs(logits_NV, batch.targets_BT[real_BT]), real_BT)
    finally:
        model.train(was)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


# AdamW betas for the RL update: beta2 0.99 instead of torch's 0.999 so that the second-moment
# estimate follows the fast-changing RL gradients within ~100 steps (the tiny preset runs a few
# hundred updates); no weight decay, which would pull the policy toward zero rather than the base.
RL_BETAS = (0.9, 0.99)


def make_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW for the policy update, fused (one kernel over all tensors) where the devices allow.

    The fused kernel exists for CPU and CUDA parameters in torch >= 2.4; it is the same AdamW
    update (equal to the loop implementation within float rounding: test) at about half the
    optimizer time of the default per-tensor loop on the tiny CPU policy (BENCHMARKS.md). Other
    devices or dtypes fall back to the default implementation.
    """
    # why a check here: torch validates devices at the first step(), not in the constructor
    fused = all(p.device.type in _FUSED_ADAMW_DEVICES and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=RL_BETAS, weight_decay=0.0, fused=fused or None)


_FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # torch.optim.AdamW(fused=True) kernels (torch >= 2.4)


def allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """SUM gradients over ranks in one flat buffer (missing grads count as zero)."""
    if world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    from r1zero.train import dist as rdist

    rdist.all_reduce(flat)
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n


class NanGuard:
    """Count non-finite updates; raise after ``abort_after`` in a row."""

    def __init__(self, abort_after: int):
        self.abort_after = abort_after
        self.in_a_row = 0
        self.total = 0

    def ok(self, *values: float) -> bool:
        if all(math.isfinite(v) for v in values):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.abort_after:
            raise RuntimeError(f"GRPO aborted: {self.in_a_row} consecutive non-finite updates "
                               f"(loss/grad NaN or inf); see grpo.nan_abort_after")
        return False

    def state(self) -> dict:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load(self, st: dict) -> None:
        self.in_a_row, self.total = int(st["in_a_row"]), int(st["total"])


def policy_update(model, optimizer, batch: Batch, adv, gcfg, *, params: list, guard: NanGuard,
                  old_logp_BT: torch.Tensor | None = None, ref_logp_BT: torch.Tensor | None = None,
                  value_head=None, old_values_BT: torch.Tensor | None = None,
                  returns_BT: torch.Tensor | None = None, local_fraction: float = 1.0) -> dict:
    """``gcfg.mu`` optimiser steps on one batch; returns summed stats (already reduced over ranks).

    ``adv`` is adv_B (GRPO/RLOO) or adv_BT (PPO). The MoE auxiliary loss (a mean over this rank's
    real tokens) is weighted by the rank's share of the real tokens of every rank (all-reduced
    here), so the ranks' sum is the token-weighted mean. ``local_fraction`` (the rank's share of
    the completions, the weight used before) is not used any more; it is accepted for callers.
    """
    model.train()
    dev = _device(model)
    batch = batch.to(dev)
    adv, old_logp_BT, ref_logp_BT, old_values_BT, returns_BT = (
        None if t is None else t.to(dev) for t in (adv, old_logp_BT, ref_logp_BT, old_values_BT, returns_BT))
    mask_BT = batch.mask_BT
    real_BT = mask_BT.bool()
    targets_N = batch.targets_BT[real_BT]
    stats = {"loss": 0.0, "tokens": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl_sum": 0.0, "entropy_sum": 0.0,
             "grad_norm": 0.0, "skipped": 0, "value_loss": 0.0}
    _, den_local = _denominator(mask_BT, gcfg)
    den = all_sum([den_local])[0]
    n_tok_global = all_sum([float(mask_BT.sum())])[0]
    for it in range(gcfg.mu):
        optimizer.zero_grad(set_to_none=False)
        logits_NV, out = forward_completion(model, batch, gcfg.temperature)
        logp_NV = log_probs(logits_NV)  # one log-softmax for the log-probs and the entropy
        logp_BT = unpack(pick(logp_NV, targets_N), real_BT)
        old = logp_BT.detach() if old_logp_BT is None else old_logp_BT
        num, _, st = policy_loss(logp_BT, old, adv, mask_BT, eps_low=gcfg.eps_low, eps_high=gcfg.eps_high,
                                 beta=gcfg.beta, ref_logp_BT=ref_logp_BT, agg=gcfg.loss_agg,
                                 max_len=gcfg.max_new_tokens)
        loss = num / max(den, 1e-12)
        vl_value = 0.0
        if value_head is not None:
            v_BT = value_head.values()[:, -(mask_BT.shape[1] + 1):-1]
            vsum, _ = value_loss(v_BT, old_values_BT, returns_BT, mask_BT)
            vl = vsum / max(n_tok_global, 1.0)
            loss = loss + gcfg.value_coef * vl
            vl_value = float(vl.detach())
        aux = getattr(out, "aux_loss", None)
        if aux is not None and torch.is_tensor(aux) and aux.requires_grad:
            n_aux = aux_tokens(out, batch)
            loss = loss + aux * (n_aux / max(all_sum([n_aux])[0], 1.0))
        loss.backward()
        allreduce_grads(params)
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, gcfg.grad_clip if gcfg.grad_clip > 0 else float("inf")))
        loss_sum = all_sum([float(loss.detach())])[0]
        if guard.ok(loss_sum, gnorm):
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=False)
            stats["skipped"] += 1
        if it == 0:
            with torch.no_grad():
                ent = float(entropy_of(logp_NV.detach()).sum())
            stats["entropy_sum"] = ent
        stats["loss"] += loss_sum / gcfg.mu
        stats["grad_norm"] += gnorm / gcfg.mu
        stats["value_loss"] += vl_value / gcfg.mu
        for k in ("tokens", "clip_low", "clip_high"):
            stats[k] += st[k] / gcfg.mu
        if it == 0:  # KL(pi_theta || pi_ref) of the policy that generated the batch (before this step's updates)
            stats["kl_sum"] = st["kl_sum"]
    red = all_sum([stats["tokens"], stats["clip_low"], stats["clip_high"], stats["kl_sum"], stats["entropy_sum"],
                   stats["value_loss"]])
    stats.update(tokens=red[0], clip_low=red[1], clip_high=red[2], kl_sum=red[3], entropy_sum=red[4],
                 value_loss=red[5] / world()[1])
    return stats


def _denominator(mask_BT: torch.Tensor, gcfg) -> tuple[None, float]:
    n = mask_BT.shape[0]
    if gcfg.loss_agg == "sequence":
        return None, float(n)
    if gcfg.loss_agg == "token":
        return None, float(mask_BT.sum())
    return None, float(n * gcfg.max_new_tokens)
