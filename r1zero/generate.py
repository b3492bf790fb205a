"""Batched, KV-cached sampling from any transformers causal LM (GRPO rollouts and evaluation).

    from r1zero.generate import sample
    out = sample(model, [[5, 6, 7], [5, 6]], max_new_tokens=32, temperature=1.0, top_p=1.0,
                 eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    out.completion_ids  # list of token lists, EOS included when produced
    out.truncated       # True where max_new_tokens was reached without EOS

How it is fast (compared with ``model.generate()``):
- identical prompts (GRPO's G copies of each prompt) are prefilled once and the KV cache is then
  expanded row-wise, so prefill cost is per unique prompt, not per completion;
- prompts are left-padded with an attention mask and explicit position ids, and only the last
  position's logits are computed at prefill (``logits_to_keep=1`` when the model supports it);
- rows that emitted EOS are dropped from the batch (and from the KV cache) in chunks, so late steps
  only pay for the rows still running;
- the per-token loop is a single forward plus one sampling op (inverse-CDF draw): no
  logits-processor chain, stopping-criteria objects or ``prepare_inputs_for_generation`` round
  trips; for transformers' own SDPA models the (key-padding) attention mask is passed prebuilt;
- everything runs under ``torch.inference_mode()``;
- every model runs its own forward (one transformer implementation): r1zero's model with its
  preallocated :class:`~r1zero.model.layers.KVCache` (no per-step cache growth; RoPE tables
  computed once; a small MoE decoded densely inside ``MoELayer.forward``), any other causal LM
  (transformers' Llama, Qwen2, Mistral, GPT-2, ...) with transformers' own cache.

Greedy (argmax) when ``temperature == 0``. Sampling draws come from ``generator`` so results are
reproducible for a given generator seed.

Legend: B = rows (completions), U = unique prompts, L = prompt length (padded), V = vocab.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

# Compact the batch once this fraction of the running rows has finished (at least one row).
# Selecting rows copies the KV cache, so compacting on every single finished row costs more than
# it saves on a 2-core CPU; 1/8 was the best of {1/16, 1/8, 1/4} in benchmarks/bench_grpo.py.
_COMPACT_FRACTION = 0.125

# r1zero's model decodes with its preallocated KVCache (False: transformers' DynamicCache, the
# peer in benchmarks/bench_grpo_preset.py; same tokens for a seed, tests/test_generate.py).
_STATIC_CACHE = True


@dataclass(frozen=True)
class GenerationOutput:
    completion_ids: list[list[int]]  # generated tokens per row, EOS included when produced
    truncated: list[bool]  # True when the row hit max_new_tokens without EOS


def _forward_kwargs(model) -> tuple[str, bool]:
    """Name of the cache kwarg (transformers 5: ``cache``; older/custom: ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _prebuilt_mask_ok(model) -> bool:
    """Whether the model takes a prepared boolean 4D mask as-is (transformers' own models on SDPA,
    r1zero's model).

    transformers' ``create_causal_mask`` (and r1zero's ``attention_mask_4d``) returns a 4D mask
    unchanged; for one new token the causal part is trivial, so the mask is just key padding:
    building it ourselves skips the per-step mask construction (a sizeable share of a tiny model's
    decode step). Other models get the 2D mask.
    """
    if type(model).__module__.startswith("r1zero.model"):
        return True
    return (type(model).__module__.startswith("transformers.")
            and getattr(model.config, "_attn_implementation", None) == "sdpa")


def _new_cache(model, max_len: int):
    """r1zero's preallocated cache for its own model; transformers' cache for any other."""
    from transformers import DynamicCache

    from r1zero.model.layers import KVCache
    from r1zero.model.modeling import R1ZeroForCausalLM

    if isinstance(model, R1ZeroForCausalLM) and _STATIC_CACHE:
        return KVCache(model.config.num_hidden_layers, max_len)

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()


def _returned_cache(out, cache_kw: str, cache):
    got = getattr(out, cache_kw, None)
    return cache if got is None else got


def _select_rows(cache, idx_B: torch.Tensor):
    """Keep/expand the cache rows ``idx_B`` (repeats allowed). Returns the (possibly new) cache."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(idx_B)
        return cache
    # legacy tuple-of-tuples cache
    return tuple(tuple(t.index_select(0, idx_B) for t in layer) for layer in cache)


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: argmax when temperature == 0, else temperature + nucleus (top-p) sampling."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        drop_BV = (probs_BV.cumsum(dim=-1) - probs_BV) >= top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)
    # inverse-CDF draw: one uniform per row (torch.multinomial costs ~5x more per call here)
    cdf_BV = logits_BV.softmax(dim=-1).cumsum(dim=-1)
    # drawn on the generator's device (a CPU generator also drives a GPU model: same draws anywhere)
    u_B1 = torch.rand((cdf_BV.shape[0], 1), generator=generator,
                      device=cdf_BV.device if generator is None else generator.device)
    u_B1 = u_B1.to(cdf_BV.device) * cdf_BV[:, -1:]
    return torch.searchsorted(cdf_BV, u_B1, right=True).squeeze(-1).clamp(max=cdf_BV.shape[-1] - 1)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> (ids_BL, mask_BL)."""
    width = max(1, max(len(s) for s in seqs))
    ids_BL = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask_BL = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids_BL, mask_BL


class _Decoder:
    """Prefill and decode steps through ``model(...)`` and its cache (see :func:`_new_cache`).

    The key-padding mask is preallocated for the whole call (prompt mask, then ones) and sliced
    per step; finished rows are dropped from it and from the cache together.
    """

    def __init__(self, model):
        self.model = model
        self.cache_kw, self.has_keep = _forward_kwargs(model)
        self.fast_mask = _prebuilt_mask_ok(model)

    def prefill(self, ids_UL, mask_UL, pos_UL, src_B, max_new_tokens):
        n, L = src_B.shape[0], ids_UL.shape[1]
        self.cache = _new_cache(self.model, L + max_new_tokens)
        kw = {self.cache_kw: self.cache, "use_cache": True}
        if self.has_keep:
            kw["logits_to_keep"] = 1
        out = self.model(input_ids=ids_UL, attention_mask=mask_UL, position_ids=pos_UL, **kw)
        self.cache = _returned_cache(out, self.cache_kw, self.cache)
        logits_BV = out.logits[:, -1, :]
        mask_UT = torch.cat([mask_UL, mask_UL.new_ones((mask_UL.shape[0], max_new_tokens))], 1)
        if ids_UL.shape[0] != n or not torch.equal(src_B, torch.arange(n, device=src_B.device)):
            self.cache = _select_rows(self.cache, src_B)
            logits_BV = logits_BV.index_select(0, src_B)
            mask_UT = mask_UT.index_select(0, src_B)
        self.mask_BT = mask_UT.bool() if self.fast_mask else mask_UT
        self.width = L
        return logits_BV

    def select(self, idx_B):
        self.cache = _select_rows(self.cache, idx_B)
        self.mask_BT = self.mask_BT.index_select(0, idx_B)

    def step(self, tok_B, pos_B):
        self.width += 1
        att = self.mask_BT[:, :self.width]
        if self.fast_mask:
            att = att[:, None, None, :]
        out = self.model(input_ids=tok_B[:, None], attention_mask=att, position_ids=pos_B[:, None],
                         **{self.cache_kw: self.cache, "use_cache": True})
        self.cache = _returned_cache(out, self.cache_kw, self.cache)
        return out.logits[:, -1, :]


@torch.inference_mode()
def sample(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, *, eos_id: int, pad_id: int,
           generator: torch.Generator | None = None) -> GenerationOutput:
    """Sample one completion per prompt row (see module docstring)."""
    n = len(prompt_ids)
    if n == 0 or max_new_tokens <= 0:
        return GenerationOutput([[] for _ in range(n)], [max_new_tokens <= 0] * n)
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample: every prompt needs at least one token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        dec = _Decoder(model)
        # --- prefill each unique prompt once, then one row per requested completion
        keys = [tuple(p) for p in prompt_ids]
        uniq: dict[tuple, int] = {}
        for k in keys:
            uniq.setdefault(k, len(uniq))
        ids_UL, mask_UL = left_pad([list(k) for k in uniq], pad_id)
        ids_UL, mask_UL = ids_UL.to(device), mask_UL.to(device)
        pos_UL = (mask_UL.cumsum(-1) - 1).clamp(min=0)
        src_B = torch.tensor([uniq[k] for k in keys], dtype=torch.long, device=device)
        logits_BV = dec.prefill(ids_UL, mask_UL, pos_UL, src_B, max_new_tokens)
        next_pos_B = pos_UL[:, -1].index_select(0, src_B) + 1
        rows_B = torch.arange(n, device=device)  # original row of each running row
        steps: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (rows or None = all n, tokens)
        compacted = False
        done_B = torch.zeros(n, dtype=torch.bool, device=device)  # emitted EOS, still in the batch
        for t in range(max_new_tokens):
            tok_B = sample_next(logits_BV, temperature, top_p, generator).masked_fill(done_B, pad_id)
            steps.append((rows_B if compacted else None, tok_B))
            done_B = done_B | (tok_B == eos_id)
            if t == max_new_tokens - 1:
                break
            n_done = int(done_B.sum())
            if n_done == done_B.numel():
                break
            if n_done and n_done >= max(1, int(_COMPACT_FRACTION * done_B.numel())):
                keep_B = (~done_B).nonzero().squeeze(-1)
                dec.select(keep_B)
                rows_B, tok_B, next_pos_B = rows_B[keep_B], tok_B[keep_B], next_pos_B[keep_B]
                done_B = done_B[keep_B]
                compacted = True
            logits_BV = dec.step(tok_B.masked_fill(done_B, pad_id), next_pos_B)
            next_pos_B = next_pos_B + 1
    finally:
        model.train(was_training)
    out_NT = torch.full((n, len(steps)), pad_id, dtype=torch.long)
    for t, (rows, tok) in enumerate(steps):
        if rows is None:
            out_NT[:, t] = tok.cpu()
        else:
            out_NT[rows.cpu(), t] = tok.cpu()
    completions, truncated = [], []
    for row in out_NT.tolist():
        try:
            m = row.index(eos_id) + 1
        except ValueError:
            m = None
        completions.append(row[:m] if m else row)
        truncated.append(m is None)
    return GenerationOutput(completions, truncated)
