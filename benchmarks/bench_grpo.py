"""GRPO step and generation throughput: r1zero vs TRL ``GRPOTrainer`` and vs ``model.generate()``.

    .venv/bin/python benchmarks/bench_grpo.py                    # table
    .venv/bin/python benchmarks/bench_grpo.py --json --repeats 3 # last line: JSON figures
    .venv/bin/python benchmarks/bench_grpo.py --policy runs/tiny/pretrain --data runs/tiny/data \
        --prompts 16 --max-new-tokens 72                          # the tiny preset's policy and step

Default setup (the issue's comparison):

Both sides get the same tiny ``LlamaForCausalLM`` (same seed), the same ``PreTrainedTokenizerFast``
(an HF ``tokenizers`` BPE trained here), the same prompts, G, completion length, temperature 1,
top-p 1, beta 0 (no reference model), mu 1, token-level loss, and the same reward function, on CPU,
in fp32 without gradient checkpointing (TRL's own defaults, bf16 autocast and gradient
checkpointing, are switched off so that both sides do the same arithmetic), with the fused
AdamW kernel (transformers' default ``adamw_torch_fused`` on TRL's side,
:func:`r1zero.grpo.update.make_optimizer` on r1zero's).

- step: one full GRPO step (sample G completions per prompt, reward, group advantages, one
  optimizer update). r1zero: :func:`r1zero.grpo.rollout.generate_groups`-equivalent sampling with
  :func:`r1zero.generate.sample` + :func:`r1zero.grpo.update.policy_update` (the policy's own forward;
  for a Llama policy transformers' cache at decode and the shared-prompt training forward). TRL: ``trainer.train``
  for ``steps`` steps, timed per step by a callback (the first steps are warm-up and dropped).
  Figure: completion tokens per second of step wall time.
- generate: :func:`r1zero.generate.sample` vs ``model.generate(do_sample=True)`` on the same
  P*G rows (G copies of each prompt, as TRL passes them). Figure: generated tokens per second.

With ``--policy DIR --data DIR`` both sides instead get a copy of that policy (the preset's
pretrained r1zero MoE base, which TRL trains as any transformers causal LM) and its tokenizer,
and the R1-Zero-template prompts of the data artifact's train split (RL domains, in order).
Unlike the random toy model, whose completions nearly all run to the length limit, a pretrained
base stops at EOS, so completion lengths vary as in a real run.

The machine is shared, so wall-clock numbers are noisy: the two sides are interleaved in one
process and repeated (``--repeats``), and the primary figure uses *process CPU time*
(``--clock cpu``, default) with one intra-op thread on both sides (``--threads 1``): on an
oversubscribed machine OpenMP spin-waits and preemption make wall time mostly a measure of the
neighbours. ``--clock wall --threads 2`` measures wall time instead. Medians are reported; ratios
are what to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import tempfile
import time
import warnings

import torch

P, G, MAX_NEW = 4, 8, 16  # 4 prompts x 8 = 32 completions of up to 16 tokens per step (--prompts ...)
CLOCK = time.process_time  # set from --clock
POLICY = None  # (model, tokenizer) loaded from --policy; None: the toy Llama below


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"What is {a} + {b}? The answer is {a + b}." for a in range(30) for b in range(30)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def build_model(tok, seed: int = 0):
    if POLICY is not None:
        return copy.deepcopy(POLICY[0]).train()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg)


def reward_fn(texts: list[str]) -> list[float]:
    """Same cheap reward on both sides: fraction of digits in the completion."""
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


PROMPTS = [f"What is {a} + {b}?" for a, b in ((3, 4), (12, 7), (21, 5), (9, 9), (14, 2), (6, 17), (8, 8), (1, 29))]


# ---------------------------------------------------------------------------------------------
# r1zero


def r1zero_steps(tok, steps: int) -> list[tuple[float, int]]:
    from r1zero.config import GRPOConfig
    from r1zero.generate import sample
    from r1zero.grpo.advantages import advantages
    from r1zero.grpo.update import NanGuard, build_batch, make_optimizer, policy_update

    model = build_model(tok)
    cfg = GRPOConfig(group_size=G, max_new_tokens=MAX_NEW, beta=0.0, mu=1, loss_agg="token", lr=1e-6)
    params = list(model.parameters())
    opt = make_optimizer(params, cfg.lr)  # what `r1zero grpo` uses
    guard = NanGuard(5)
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in range(steps):
        t0 = CLOCK()
        prompts = [tok(PROMPTS[(s * P + i) % len(PROMPTS)], add_special_tokens=False)["input_ids"] for i in range(P)]
        rows = [p for p in prompts for _ in range(G)]
        res = sample(model, rows, MAX_NEW, 1.0, 1.0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generator=gen)
        texts = tok.batch_decode(res.completion_ids, skip_special_tokens=True)
        rewards = torch.tensor(reward_fn(texts))
        groups = torch.arange(P).repeat_interleave(G)
        adv = advantages(rewards, groups, "group")
        batch = build_batch(rows, res.completion_ids, tok.pad_token_id)
        policy_update(model, opt, batch, adv, cfg, params=params, guard=guard)
        out.append((CLOCK() - t0, sum(len(c) for c in res.completion_ids)))
    return out


# ---------------------------------------------------------------------------------------------
# TRL


def trl_steps(tok, steps: int) -> list[tuple[float, int]]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model = build_model(tok)
    ds = Dataset.from_dict({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(P * (steps + 2))]})
    times: list[float] = []
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = CLOCK()

        def on_step_end(self, args, state, control, **kw):
            times.append(CLOCK() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    def reward(completions, **kw):
        return reward_fn(completions)

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(output_dir=out_dir, use_cpu=True, per_device_train_batch_size=P * G, num_generations=G,
                          max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, beta=0.0, num_iterations=1,
                          loss_type="dapo", learning_rate=1e-6, max_steps=steps, logging_steps=1, report_to="none",
                          save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
                          # as on the r1zero side: fp32 (TRL defaults to bf16 autocast) and no
                          # gradient checkpointing (TRL's default would recompute the forward)
                          bf16=False, fp16=False, gradient_checkpointing=False)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                              callbacks=[Timer()])
        with contextlib.redirect_stdout(io.StringIO()):  # TRL prints every log dict
            trainer.train()
    n = P * G
    return [(t, int(round(n * (lengths[i] if i < len(lengths) else MAX_NEW)))) for i, t in enumerate(times)]


# ---------------------------------------------------------------------------------------------
# generation only


def gen_compare(tok, repeats: int) -> tuple[list[float], list[float]]:
    from r1zero.generate import left_pad, sample

    model = build_model(tok).eval()
    rows = [tok(PROMPTS[i % len(PROMPTS)], add_special_tokens=False)["input_ids"] for i in range(P) for _ in range(G)]
    ours, hf = [], []
    gen = torch.Generator().manual_seed(0)
    for _ in range(repeats + 1):
        t0 = CLOCK()
        res = sample(model, rows, MAX_NEW, 1.0, 1.0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generator=gen)
        ours.append(sum(len(c) for c in res.completion_ids) / (CLOCK() - t0))
        ids, mask = left_pad(rows, tok.pad_token_id)
        t0 = CLOCK()
        with torch.inference_mode():
            outs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=True,
                                  temperature=1.0, top_p=1.0, top_k=0, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
        dt = CLOCK() - t0
        new = outs[:, ids.shape[1]:]
        n = 0
        for row in new.tolist():
            for t in row:
                n += 1
                if t == tok.eos_token_id:
                    break
        hf.append(n / dt)
    return ours[1:], hf[1:]  # drop the warm-up round


def main() -> None:
    global CLOCK, POLICY, PROMPTS, P, G, MAX_NEW
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="GRPO steps per side per repeat (first 2 dropped)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    ap.add_argument("--policy", help="a transformers causal LM dir (with tokenizer) instead of the toy Llama")
    ap.add_argument("--data", help="with --policy: a data artifact whose train-split prompts to use")
    ap.add_argument("--prompts", type=int, default=P, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=G)
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW)
    a = ap.parse_args()
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    P, G, MAX_NEW = a.prompts, a.group_size, a.max_new_tokens
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if bool(a.policy) != bool(a.data):
        ap.error("--policy and --data go together")
    if a.policy:
        from r1zero.grpo.inputs import RL_DOMAINS, load_policy, load_rows
        from r1zero.template import render_prompt

        POLICY = load_policy(a.policy)
        PROMPTS = [render_prompt(r["prompt"]) for r in load_rows(a.data, "train") if r.get("domain") in RL_DOMAINS]
        tok = POLICY[1]
    else:
        tok = build_tokenizer()
    ours_step, trl_step = [], []
    for _ in range(a.repeats):
        r = r1zero_steps(tok, a.steps)[2:]
        ours_step.append(sum(n for _, n in r) / sum(t for t, _ in r))
        t = trl_steps(tok, a.steps)[2:]
        trl_step.append(sum(n for _, n in t) / sum(s for s, _ in t))
    ours_gen, hf_gen = gen_compare(tok, a.repeats)
    res = {
        "r1zero_tokens_per_s": statistics.median(ours_step),
        "trl_tokens_per_s": statistics.median(trl_step),
        "r1zero_generate_tokens_per_s": statistics.median(ours_gen),
        "hf_generate_tokens_per_s": statistics.median(hf_gen),
    }
    res_ratio = {"step_ratio": res["r1zero_tokens_per_s"] / res["trl_tokens_per_s"],
                 "generate_ratio": res["r1zero_generate_tokens_per_s"] / res["hf_generate_tokens_per_s"]}
    print(f"setup: {P} prompts x G={G}, <= {MAX_NEW} new tokens, "
          f"{'policy ' + a.policy if a.policy else 'tiny Llama (2 layers, d=64)'}, CPU, "
          f"{torch.get_num_threads()} threads, {a.clock} clock, {a.repeats} repeats")
    print(f"GRPO step   r1zero {res['r1zero_tokens_per_s']:8.1f} tok/s   TRL {res['trl_tokens_per_s']:8.1f} tok/s   "
          f"ratio {res_ratio['step_ratio']:.2f}x   (per repeat: {[round(x, 1) for x in ours_step]} vs "
          f"{[round(x, 1) for x in trl_step]}, ratios {[round(x / y, 2) for x, y in zip(ours_step, trl_step)]})")
    print(f"generation  r1zero {res['r1zero_generate_tokens_per_s']:8.1f} tok/s   HF generate "
          f"{res['hf_generate_tokens_per_s']:8.1f} tok/s   ratio {res_ratio['generate_ratio']:.2f}x   (per repeat: "
          f"{[round(x, 1) for x in ours_gen]} vs {[round(x, 1) for x in hf_gen]}, "
          f"ratios {[round(x / y, 2) for x, y in zip(ours_gen, hf_gen)]})")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
