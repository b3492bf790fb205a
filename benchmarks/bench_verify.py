"""Verification cost next to its peers, in one run (ratios; the machine is shared and noisy).

1. Math rewards: ``r1zero.verify.verify_many`` vs TRL's ``trl.rewards.accuracy_reward`` (math-verify
   on every pair) on the same generated problems, with half the predictions right (often
   re-formatted: ``\\frac``, decimals, ``\\boxed``) and half wrong. Also reports how often each
   matches the truth. ``math_symbolic`` repeats it on radicals/polynomials, where both sides must
   call math-verify (the fast path cannot help there).
2. Sandbox: ``r1zero.sandbox.run_code`` vs a bare ``subprocess.run([python, "-I", "-S", "-c", prog])``
   (no protections) on the same find_input harness programs, plus ``verify_many`` running those
   checks 4 at a time.

    .venv/bin/python benchmarks/bench_verify.py --pairs 400 --programs 24 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from fractions import Fraction

import r1zero.verify as V
from r1zero.data import gen_code, gen_math
from r1zero.sandbox.runner import plan, run_code
from r1zero.verify import _harness, _math_symbolic, _RunCache, verify_many


def _reformat(answer: str, rng: random.Random) -> str:
    """A right answer written differently (what a model might emit)."""
    try:
        q = Fraction(answer)
    except ValueError:
        return answer
    choice = rng.randrange(3)
    if choice == 0 and q.denominator != 1:
        return f"\\frac{{{q.numerator}}}{{{q.denominator}}}"
    if choice == 1:
        return f"\\boxed{{{answer}}}"
    return f"{float(q):.6f}" if q.denominator != 1 else f"{answer}.0"


def math_pairs(n: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    rng = random.Random(seed)
    items, preds = [], []
    for i in range(n):
        it = gen_math.generate(rng, 1 + i % 3)
        items.append(dict(it, id=str(i), domain="math", meta=json.dumps(it["meta"])))
        if i % 2 == 0:
            preds.append(_reformat(it["answer"], rng))
        else:
            try:
                preds.append(str(Fraction(it["answer"]) + 1))
            except ValueError:
                preds.append(it["answer"] + "1")
    return items, preds


def symbolic_pairs(n: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Answers no number parser handles (radicals, polynomials): both sides need math-verify."""
    rng = random.Random(seed)
    items, preds = [], []
    for i in range(n):
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
        if i % 2 == 0:
            gold, pred = f"\\sqrt{{{a}}}/{b}", f"\\frac{{\\sqrt{{{a}}}}}{{{b}}}"
        else:
            gold, pred = f"{a}x+{c}", f"{c}+{a}*x"
        if i % 4 >= 2:  # make half of them wrong
            pred = pred.replace(str(a), str(a + 1), 1) if i % 2 == 0 else f"{c}+{a + 1}*x"
        items.append({"id": str(i), "domain": "math", "answer": gold, "meta": "{}"})
        preds.append(pred)
    return items, preds


def bench_math(n: int, repeats: int, symbolic: bool = False) -> dict:
    from trl.rewards import accuracy_reward

    items, preds = symbolic_pairs(n) if symbolic else math_pairs(n)
    verify_many(items[:8], preds[:8])  # warm-up: lazy imports (math-verify, sympy) on both sides
    accuracy_reward([[{"content": "\\boxed{1}"}]], ["1"])
    ours, trl = [], []
    for _ in range(repeats):
        _math_symbolic.cache_clear()
        t = time.perf_counter()
        verdicts = verify_many(items, preds)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        rewards = accuracy_reward([[{"role": "assistant", "content": f"\\boxed{{{p}}}"}] for p in preds],
                                  [it["answer"] for it in items])
        trl.append(time.perf_counter() - t)
    scored = [(v, r) for v, r in zip(verdicts, rewards) if r is not None]  # TRL skips golds it cannot parse
    agree = sum(bool(v.correct) == bool(r) for v, r in scored) / max(1, len(scored))
    expected = [i % 4 < 2 for i in range(n)] if symbolic else [i % 2 == 0 for i in range(n)]
    return {"pairs": n, "r1zero_s": [round(x, 3) for x in ours], "trl_s": [round(x, 3) for x in trl],
            "r1zero_pairs_per_s": round(n / statistics.median(ours)), "trl_pairs_per_s": round(n / statistics.median(trl)),
            "speedup_median": round(statistics.median(trl) / statistics.median(ours), 1),
            "r1zero_matches_truth": sum(bool(v.correct) == e for v, e in zip(verdicts, expected)) / n,
            "trl_matches_truth_where_scored": round(sum(bool(r) == e for r, e in zip(rewards, expected) if r is not None)
                                                    / max(1, len(scored)), 3),
            "trl_skipped": n - len(scored), "agreement_where_trl_scored": round(agree, 3)}


def find_input_programs(n: int, seed: int = 1) -> tuple[list[dict], list[str], list[str]]:
    rng = random.Random(seed)
    items, preds, programs = [], [], []
    while len(items) < n:
        it = gen_code.generate(rng, 1 + len(items) % 3)
        meta = it["meta"]
        if meta["kind"] != "find_input":
            continue
        pred = repr(meta["input"] + len(items) % 2)  # half right, half (probably) wrong
        items.append(dict(it, id=str(len(items)), domain="code", meta=json.dumps(meta)))
        preds.append(pred)
        programs.append(_harness(meta["source"], "f", [eval(pred)], {}))  # noqa: S307 - our own literal
    return items, preds, programs


def bench_sandbox(n: int, repeats: int) -> dict:
    items, preds, programs = find_input_programs(n)
    python = plan().python
    bare, ours, batched = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        for prog in programs:
            subprocess.run([python, "-I", "-S", "-c", prog], capture_output=True, timeout=10, check=False)
        bare.append((time.perf_counter() - t) / n)
        t = time.perf_counter()
        for prog in programs:
            run_code(prog, timeout_s=2.0)
        ours.append((time.perf_counter() - t) / n)
        V._RUNS = _RunCache()  # cold cache: every program really runs
        t = time.perf_counter()
        verify_many(items, preds)
        batched.append((time.perf_counter() - t) / n)
    med = statistics.median
    return {"programs": n, "python": python, "bare_ms": [round(x * 1e3, 1) for x in bare],
            "run_code_ms": [round(x * 1e3, 1) for x in ours], "verify_many_ms_per_item": [round(x * 1e3, 1) for x in batched],
            "run_code_over_bare": round(med(ours) / med(bare), 2),
            "verify_many_over_sequential_run_code": round(med(batched) / med(ours), 2),
            "protections": list(run_code("pass").protections)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--programs", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps({"math": bench_math(args.pairs, args.repeats),
                      "math_symbolic": bench_math(max(8, args.pairs // 4), args.repeats, symbolic=True),
                      "sandbox": bench_sandbox(args.programs, args.repeats)}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
