"""GRPO step pieces on the tiny preset's own policy: r1zero's default paths vs their peers.

    .venv/bin/python benchmarks/bench_grpo_preset.py --policy runs/tiny/pretrain --data runs/tiny/data

(``r1zero data mix --out runs/tiny/data`` and ``r1zero pretrain --data runs/tiny/data --out
runs/tiny/pretrain`` with ``configs/tiny.yaml`` write both; ``make run`` keeps them as
``runs/tiny/kfp/<run>/data-mix/data`` and ``.../pretrain/model``). ``bench_grpo.py`` compares against TRL on a toy Llama whose
completions nearly all run to the length limit; this benchmark measures what a real `r1zero grpo`
step on the preset does: 16 prompts x G=8 from the train split, up to 72 new tokens sampled from
the pretrained MoE base (most completions stop early, so the batch is ragged), then one policy
update on 8 of those groups (dynamic sampling keeps about half). Pieces, interleaved and repeated
in one process, process CPU time, one intra-op thread:

- sampling: :func:`r1zero.generate.sample` (the model's own forward with its preallocated
  ``KVCache``, the MoE decoded densely inside ``MoELayer.forward``) vs the same with the routed
  MoE path at decode (``routed``) vs the same with transformers' ``DynamicCache`` (``dynamic``);
- update: :func:`r1zero.grpo.update.policy_update` with the shared-prompt forward (each unique
  prompt once, completions in length buckets from its cache) vs ``SHARED_PROMPT_FORWARD = False``
  (``model(...)`` over the padded batch). Same batch, same advantages; each side updates its own
  copy of the policy.

Prints a table, and with ``--json`` a last line of figures (tokens/s and ms, medians).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch

N_PROMPTS, G, MAX_NEW, UPDATE_GROUPS = 16, 8, 72, 8  # configs/tiny.yaml grpo: 16 x 8, 72 tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="runs/tiny/pretrain", help="pretrained base dir (r1zero pretrain --out)")
    ap.add_argument("--data", default="runs/tiny/data", help="data artifact dir (r1zero data mix --out)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)

    import r1zero.generate as gen_mod
    import r1zero.grpo.update as upd_mod
    import r1zero.model.moe as moe_mod
    from r1zero.config import GRPOConfig
    from r1zero.grpo.advantages import advantages
    from r1zero.grpo.inputs import load_policy, load_rows, prepare_entries

    model, tok = load_policy(a.policy)
    entries, _ = prepare_entries(load_rows(a.data, "train"), tok, 1 << 30)
    prompts = [e.ids for e in entries[:N_PROMPTS]]
    rows = [p for p in prompts for _ in range(G)]
    eos, pad = tok.eos_token_id, tok.pad_token_id

    dense_limit = moe_mod._DENSE_DECODE_MAX_FLOPS

    def sample(kind: str, seed: int):
        moe_mod._DENSE_DECODE_MAX_FLOPS = 0.0 if kind == "routed" else dense_limit
        gen_mod._STATIC_CACHE = kind != "dynamic"
        try:
            return gen_mod.sample(model, rows, MAX_NEW, 1.0, 1.0, eos_id=eos, pad_id=pad,
                                  generator=torch.Generator().manual_seed(seed))
        finally:
            moe_mod._DENSE_DECODE_MAX_FLOPS = dense_limit
            gen_mod._STATIC_CACHE = True

    samp = {k: [] for k in ("native", "routed", "dynamic")}
    for rep in range(a.repeats + 1):
        for kind in samp:
            t0 = time.process_time()
            out = sample(kind, rep)
            dt = time.process_time() - t0
            if rep:  # the first round warms up
                samp[kind].append(sum(len(c) for c in out.completion_ids) / dt)
            elif kind == "native":
                first = out

    # one update batch: the first UPDATE_GROUPS groups of the warm-up round's native step
    out = first
    n = UPDATE_GROUPS * G
    comps = out.completion_ids[:n]
    batch = upd_mod.build_batch(rows[:n], comps, pad)
    lens = [len(c) for c in comps]
    adv = advantages(torch.randn(n, generator=torch.Generator().manual_seed(0)),
                     torch.arange(UPDATE_GROUPS).repeat_interleave(G), "group")
    cfg = GRPOConfig(group_size=G, max_new_tokens=MAX_NEW, beta=0.0, mu=1, loss_agg="token", lr=1e-6)
    sides = {}
    for kind in ("shared", "generic"):
        m = copy.deepcopy(model).train()
        params = list(m.parameters())
        sides[kind] = (m, params, upd_mod.make_optimizer(params, cfg.lr), upd_mod.NanGuard(5))
    upd = {k: [] for k in sides}
    for rep in range(a.repeats + 1):
        for kind, (m, params, opt, guard) in sides.items():
            upd_mod.SHARED_PROMPT_FORWARD = kind == "shared"
            try:
                t0 = time.process_time()
                upd_mod.policy_update(m, opt, batch, adv, cfg, params=params, guard=guard)
                dt = time.process_time() - t0
            finally:
                upd_mod.SHARED_PROMPT_FORWARD = True
            if rep:
                upd[kind].append(dt * 1e3)

    med = {k: statistics.median(v) for k, v in samp.items()}
    medu = {k: statistics.median(v) for k, v in upd.items()}
    padded = n * max(lens)
    print(f"setup: {a.policy}, {N_PROMPTS} prompts x G={G}, <= {MAX_NEW} new tokens, {torch.get_num_threads()} "
          f"thread(s), process CPU time, {a.repeats} repeats; update batch {n} completions, {sum(lens)} real "
          f"of {padded} padded completion positions ({1 - sum(lens) / padded:.0%} padding), "
          f"prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens")
    print(f"sampling  native {med['native']:9.1f} tok/s  routed MoE decode {med['routed']:9.1f}  DynamicCache "
          f"{med['dynamic']:9.1f}   native/routed {med['native'] / med['routed']:.2f}x  native/dynamic "
          f"{med['native'] / med['dynamic']:.2f}x   (per repeat: {[round(x) for x in samp['native']]})")
    print(f"update    shared-prompt {medu['shared']:9.1f} ms     generic {medu['generic']:9.1f} ms   generic/shared "
          f"{medu['generic'] / medu['shared']:.2f}x   (per repeat: {[round(x, 1) for x in upd['shared']]} vs "
          f"{[round(x, 1) for x in upd['generic']]})")
    if a.json:
        print(json.dumps({"sample_native_tokens_per_s": med["native"], "sample_routed_tokens_per_s": med["routed"],
                          "sample_dynamic_cache_tokens_per_s": med["dynamic"], "update_shared_prompt_ms": medu["shared"],
                          "update_generic_ms": medu["generic"]}))


if __name__ == "__main__":
    main()
