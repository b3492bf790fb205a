"""vLLM-side checks for tests/grpo/test_vllm_rollout.py, run by the vLLM environment's Python.

    .venv-vllm/bin/python tests/grpo/vllm_checks.py engine POLICY_DIR OUT.json
    .venv-vllm/bin/python tests/grpo/vllm_checks.py server POLICY_DIR OUT.json

``engine``: one colocated engine for every check (engine start is most of the cost): greedy tokens
of vLLM vs r1zero's sampler vs transformers ``generate()``; sampled-token log-probs of vLLM vs the
trainer (r1zero's forward) vs stock transformers; the same after an in-place weight update.
``server``: a spawned rollout server samples, takes a weight push in small buckets, refuses to
sample while another connection's push is open and after it broke off, takes a whole push again,
then is stopped (SIGSTOP) in the middle of a push, which must end in one UserError within
``push_timeout_s``. Writes the figures as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch


def _prompts(tok) -> list[list[int]]:
    from r1zero.template import render_prompt

    qs = ["What is 12 + 7?", "Compute 3 * 14.", "What is 100 - 37?", "Reverse the string abc."]
    return [tok(render_prompt(q), add_special_tokens=False)["input_ids"] for q in qs]


def _logprob_gaps(engine, policy, hf, tok, prompts, seed: int) -> dict:
    from r1zero.grpo.update import build_batch, sequence_logprobs

    rows = [p for p in prompts for _ in range(4)]
    out, lp = engine.sample(rows, 24, 1.0, 1.0, seed=seed)
    batch = build_batch(rows, out.completion_ids, tok.pad_token_id)
    train_BT = sequence_logprobs(policy, batch, 1.0)
    hf_BT = sequence_logprobs(hf, batch, 1.0) if hf is not None else None
    gap_v, gap_h = 0.0, 0.0
    n = 0
    for i, row in enumerate(lp):
        for j, x in enumerate(row):
            gap_v = max(gap_v, abs(float(train_BT[i, j]) - x))
            if hf_BT is not None:
                gap_h = max(gap_h, abs(float(hf_BT[i, j]) - x))
            n += 1
    return {"vllm_vs_trainer_max": gap_v, "vllm_vs_hf_max": gap_h, "tokens": n}


def engine_checks(policy_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    from r1zero.config import RolloutConfig
    from r1zero.generate import sample
    from r1zero.grpo.vllm_rollout import start_engine
    from r1zero.model import load_causal_lm

    policy, tok = load_causal_lm(policy_dir)
    hf = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()  # stock transformers
    t0 = time.perf_counter()
    engine = start_engine(RolloutConfig(engine="vllm"), policy, tok, max_len=256, seed=0)
    res: dict = {"engine_start_s": time.perf_counter() - t0}
    prompts = _prompts(tok)
    try:
        out, _ = engine.sample(prompts, 32, 0.0, 1.0, seed=1)
        native = sample(policy, prompts, 32, 0.0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        hf_ids = []
        for p in prompts:
            g = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
            hf_ids.append(g[0, len(p):].tolist())
        res["greedy"] = {"vllm": out.completion_ids, "native": native.completion_ids, "hf": hf_ids,
                         "vllm_truncated": out.truncated, "native_truncated": native.truncated}
        again, _ = engine.sample([p for p in prompts for _ in range(2)], 16, 1.0, 0.9, seed=5)
        again2, _ = engine.sample([p for p in prompts for _ in range(2)], 16, 1.0, 0.9, seed=5)
        res["seeded_repeat_equal"] = again.completion_ids == again2.completion_ids
        # a GRPO step's worth of seeded prompts whose prefill exceeds one engine step's token
        # budget (4,096 here): a chunked prefill made vLLM rewind the CPU generators and crash
        big = [list(prompts[i % len(prompts)]) * 3 for i in range(128)]
        res["big_prefill_tokens"] = sum(map(len, big))
        res["big_seeded_completions"] = len(engine.sample(big, 4, 1.0, 1.0, seed=11)[0].completion_ids)
        res["logprobs_start"] = _logprob_gaps(engine, policy, hf, tok, prompts, seed=7)
        # a policy update: perturb every weight, push in place, compare again (no disk round trip)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        stale = _logprob_gaps(engine, policy, None, tok, prompts, seed=7)
        res["logprobs_stale"] = stale  # before the push: vLLM still serves the old weights
        t0 = time.perf_counter()
        engine.update_weights(policy)
        res["update_s"] = time.perf_counter() - t0
        res["logprobs_updated"] = _logprob_gaps(engine, policy, None, tok, prompts, seed=7)
        out, _ = engine.sample(prompts, 32, 0.0, 1.0, seed=1)
        native = sample(policy, prompts, 32, 0.0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        res["greedy_updated_equal"] = out.completion_ids == native.completion_ids
    finally:
        engine.close()
    return res


def server_checks(policy_dir: str) -> dict:
    from multiprocessing.connection import Client

    from r1zero.config import RolloutConfig
    from r1zero.errors import UserError
    from r1zero.grpo.rollout_server import _pack, buckets
    from r1zero.grpo.vllm_rollout import _named_tensors, start_engine
    from r1zero.model import load_causal_lm

    policy, tok = load_causal_lm(policy_dir)
    # tiny buckets (32 KiB): the ~0.3 MB policy goes in several pushes' worth of requests
    rcfg = RolloutConfig(engine="vllm", mode="server", push_timeout_s=5.0, push_bucket_mb=1 / 32)
    t0 = time.perf_counter()
    engine = start_engine(rcfg, policy, tok, max_len=256, seed=0)
    res: dict = {"server_start_s": time.perf_counter() - t0}
    prompts = _prompts(tok)

    def refused() -> str:
        try:
            engine.sample(prompts[:1], 4, 1.0, 1.0, seed=0)
            return "sampled"
        except UserError as err:
            return str(err)

    try:
        res["server_gaps"] = _logprob_gaps(engine, policy, None, tok, prompts, seed=3)
        with torch.no_grad():
            for p in policy.parameters():
                p.mul_(1.01)
        res["server_gaps_stale"] = _logprob_gaps(engine, policy, None, tok, prompts, seed=3)
        engine.update_weights(policy)
        res["push_buckets"] = engine.pushed_buckets
        res["server_gaps_after_push"] = _logprob_gaps(engine, policy, None, tok, prompts, seed=3)
        # a second trainer connection pushes one bucket and stops: sampling is refused from then on
        other = Client(engine.address, authkey=engine.key)
        assert other.recv()[0] == "ready"
        first = next(buckets(_named_tensors(policy), engine.bucket_bytes))
        other.send(("push", 0))
        other.send_bytes(_pack(first))
        res["partial_push_answer"] = other.recv()[0]
        res["sample_mid_push"] = refused()
        other.send(("bye", None))
        other.close()
        time.sleep(1.0)
        res["sample_after_broken_push"] = refused()
        with torch.no_grad():
            for p in policy.parameters():
                p.mul_(1.01)
        engine.update_weights(policy)  # a whole push commits: sampling resumes with its weights
        res["server_gaps_after_repush"] = _logprob_gaps(engine, policy, None, tok, prompts, seed=3)

        def pausing():  # the server stops (SIGSTOP) once the push is under way
            named = _named_tensors(policy)
            for i, item in enumerate(named):
                if i == len(named) // 2:
                    os.kill(engine.proc.pid, signal.SIGSTOP)
                yield item

        t0 = time.perf_counter()
        try:
            engine.load_tensors(pausing())
            res["hung_push"] = "no error"
        except UserError as err:
            res["hung_push"] = str(err)
        res["hung_push_s"] = time.perf_counter() - t0
        res["server_killed"] = engine.proc.poll() is not None
    finally:
        if engine.proc.poll() is None:
            os.kill(engine.proc.pid, signal.SIGCONT)
        engine.close()
    return res


if __name__ == "__main__":
    what, policy_dir, out = sys.argv[1:4]
    result = engine_checks(policy_dir) if what == "engine" else server_checks(policy_dir)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)
