"""Rollout engines side by side: vLLM vs r1zero's native sampler vs transformers ``generate()``.

    .venv-vllm/bin/python benchmarks/bench_rollout.py --json                 # all models, 3 repeats
    .venv-vllm/bin/python benchmarks/bench_rollout.py --json --policy runs/tiny/pretrain   # (a) = that policy
    .venv-vllm/bin/python benchmarks/bench_rollout.py --models moe_63m --repeats 1         # one model

Runs in the vLLM environment (``make vllm-env``). In one process, for each model, the three
engines get the same prompts (``--prompts`` R1-template prompts, default 4, ``--group`` completions each),
the same completion length (``--max-new-tokens``), temperature 1 and top-p 1, stop at EOS, seeded;
the repeats are interleaved (native, transformers, vLLM, native, ...) so that load from the shared
machine hits all three alike. Each model runs in its own process (vLLM's parallel state is global
to a process). Figure: completion tokens produced per second of wall time, median
of ``--repeats`` (min-max in the table). vLLM's engine start is reported apart (once per run).

Models:
- ``tiny_preset``: the tiny preset's policy (``--policy DIR``, e.g. ``r1zero pretrain``'s output), or
  without it the preset's architecture with seeded random weights (``r1zero.model.build_model``);
  a policy vLLM cannot serve (e.g. ``--set model.n_heads=4``: heads of 16, below the 32..512 vLLM's
  CPU attention runs) gets a null vLLM figure with the reason;
- ``tiny_preset_2heads``: the preset's d_model, layers and 2 heads of 32 as a dense Llama (random
  weights);
- ``moe_63m``: a Mixtral (d 512, 6 layers, 8 heads, 8 experts top-2, expert width 768; 63M params);
- ``dense_57m``: a Llama of similar size (d 768, 8 layers, 12 heads, width 2048; 57M params);
the last two with 256-token completions and random weights (completions run to the limit).

The native sampler takes the model the trainer would (``r1zero.model.load_causal_lm``: standard
Llama/Mixtral checkpoints map into r1zero's model and its decode path); ``generate()`` takes the
stock transformers model from the same directory. The last line with ``--json`` is
``{"models": {NAME: {"vllm_tokens_per_s", "native_tokens_per_s", "hf_tokens_per_s", "default_engine"}}}``
plus per-model detail (min/max, engine start, parameter count) under ``"detail"``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _tokenizer(out: Path):
    """The data tokenizer trained on a few rendered prompts (special tags included)."""
    import random

    from r1zero.data import gen_math
    from r1zero.data.tokenizer import train_tokenizer, wrap
    from r1zero.template import render_completion, render_prompt

    rng = random.Random(0)
    items = [gen_math.generate(rng, 1) for _ in range(200)]
    corpus = [render_prompt(it["prompt"]) + " " + render_completion(it["solution"], it["answer"]) for it in items]
    return wrap(train_tokenizer(corpus, 512, out / "tokenizer.json")), [render_prompt(it["prompt"]) for it in items]


def _save_random(kind: str, out: Path, tok) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=len(tok), max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    if kind == "moe_63m":
        m = MixtralForCausalLM(MixtralConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                                             num_key_value_heads=8, intermediate_size=768, num_local_experts=8,
                                             num_experts_per_tok=2, sliding_window=None, **common))
    elif kind == "dense_57m":
        m = LlamaForCausalLM(LlamaConfig(hidden_size=768, num_hidden_layers=8, num_attention_heads=12,
                                         num_key_value_heads=12, intermediate_size=2048, **common))
    else:  # tiny_preset_2heads: the preset's d_model/layers/heads as a dense Llama, read from its config
        from r1zero.config import load_config

        pm = load_config(str(ROOT / "configs" / "tiny.yaml")).model
        m = LlamaForCausalLM(LlamaConfig(hidden_size=pm.d_model, num_hidden_layers=pm.n_layers,
                                         num_attention_heads=pm.n_heads, num_key_value_heads=pm.n_heads,
                                         intermediate_size=256, **common))
    d = out / kind
    m.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def _preset_policy(out: Path, tok) -> Path:
    from r1zero.config import load_config
    from r1zero.model import build_model

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"model.vocab_size={len(tok)}"])
    m = build_model(cfg.model, seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d = out / "tiny_preset"
    from r1zero.model.hf_export import export_hf

    export_hf(m.state_dict().items(), m.config, d)
    tok.save_pretrained(str(d))
    return d


def _time(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def bench_model(name: str, model_dir: Path, prompts: list[list[int]], group: int, max_new: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    from r1zero.config import RolloutConfig
    from r1zero.errors import UserError
    from r1zero.generate import sample
    from r1zero.grpo.vllm_rollout import start_engine
    from r1zero.model import load_causal_lm

    policy, tok = load_causal_lm(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = [p for p in prompts for _ in range(group)]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    res: dict = {"params": sum(p.numel() for p in hf.parameters()), "rows": len(rows), "max_new_tokens": max_new}
    engine, why = None, None
    t0 = time.perf_counter()
    try:
        # vLLM refuses a max_model_len beyond the checkpoint's positions (the tiny preset's policy: 256)
        max_len = min(1024, getattr(hf.config, "max_position_embeddings", None) or 1024)
        engine = start_engine(RolloutConfig(engine="vllm"), policy, tok, max_len=max_len, seed=0)
        res["vllm_start_s"] = round(time.perf_counter() - t0, 1)
    except UserError as err:
        why = str(err)
        res["vllm_unsupported"] = why

    def native(seed, rows=rows, max_new=max_new):
        g = torch.Generator().manual_seed(seed)
        return sum(len(c) for c in sample(policy, rows, max_new, 1.0, 1.0, eos_id=eos, pad_id=pad,
                                          generator=g).completion_ids)

    def hf_generate(seed, rows=rows, max_new=max_new):
        torch.manual_seed(seed)
        from r1zero.generate import left_pad

        ids, mask = left_pad(rows, pad)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                              top_k=0, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad)
        gen = out[:, ids.shape[1]:].tolist()
        return sum((r.index(eos) + 1) if eos in r else len(r) for r in gen)

    def vllm(seed, rows=rows, max_new=max_new):
        out, _ = engine.sample(rows, max_new, 1.0, 1.0, seed=seed)
        return sum(len(c) for c in out.completion_ids)

    runs: dict[str, list[float]] = {"native": [], "hf": [], "vllm": []}
    engines = [("native", native), ("hf", hf_generate)] + ([("vllm", vllm)] if engine is not None else [])
    for _, fn in engines:  # warm-up (first-call allocations, kernel selection), untimed
        fn(1, rows[:8], 16)
    for r in range(repeats):
        for eng, fn in engines:
            s, n = _time(lambda fn=fn, seed=100 + r: fn(seed))
            runs[eng].append(n / s)
            print(f"{name} repeat {r} {eng}: {n} tokens in {s:.2f} s = {n / s:.0f} tokens/s", file=sys.stderr)
    if engine is not None:
        engine.close()
    for eng, xs in runs.items():
        res[f"{eng}_tokens_per_s"] = round(statistics.median(xs), 1) if xs else None
        res[f"{eng}_min_max"] = [round(min(xs), 1), round(max(xs), 1)] if xs else None
    # the rollout engines GRPO can use are vllm and native; the faster one is the default here
    res["default_engine"] = max((e for e in ("vllm", "native") if runs[e]), key=lambda e: statistics.median(runs[e]))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny_preset,tiny_preset_2heads,moe_63m,dense_57m")
    ap.add_argument("--policy", default=None, help="the tiny preset's pretrained policy dir (else random weights)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256, help="for moe_63m/dense_57m")
    ap.add_argument("--tiny-max-new-tokens", type=int, default=72, help="for the tiny preset (grpo.max_new_tokens)")
    a = ap.parse_args(argv)
    names = a.models.split(",")
    if len(names) > 1:
        # why one process per model: vLLM's parallel state is process-global, and a second
        # in-process engine for an MoE after a dense one fails ("expert parallel group is not initialized")
        out = {}
        for name in names:
            args = [x for x in (argv if argv is not None else sys.argv[1:])]
            i = args.index("--models") if "--models" in args else None
            args = (args[:i] + args[i + 2:] if i is not None else args) + ["--models", name, "--json"]
            proc = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, check=True)
            out.update(json.loads(proc.stdout.strip().splitlines()[-1])["detail"])
        return _report(out, a.json)
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    tok, texts = _tokenizer(work)
    out: dict = {}
    for name in a.models.split(","):
        if name == "tiny_preset":
            d = Path(a.policy) if a.policy else _preset_policy(work, tok)
            from r1zero.model import load_causal_lm

            ptok = load_causal_lm(d)[1] if a.policy else tok
            max_new = a.tiny_max_new_tokens
        else:
            d, ptok, max_new = _save_random(name, work, tok), tok, (
                a.tiny_max_new_tokens if name == "tiny_preset_2heads" else a.max_new_tokens)
        prompts = [ptok(t, add_special_tokens=False)["input_ids"] for t in texts[:a.prompts]]
        out[name] = bench_model(name, d, prompts, a.group, max_new, a.repeats)
        print(json.dumps({name: out[name]}), file=sys.stderr)
    return _report(out, a.json)


def _report(out: dict, as_json: bool) -> int:
    summary = {"models": {k: {f: v.get(f) for f in ("vllm_tokens_per_s", "native_tokens_per_s", "hf_tokens_per_s",
                                                     "default_engine")} for k, v in out.items()},
               "detail": out, "device": "cuda" if torch.cuda.is_available() else "cpu",
               "threads": torch.get_num_threads()}
    if as_json:
        print(json.dumps(summary))
    else:
        for k, v in out.items():
            print(f"{k:20s} vllm {v['vllm_tokens_per_s']} native {v['native_tokens_per_s']} hf {v['hf_tokens_per_s']}"
                  f" -> {v['default_engine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
