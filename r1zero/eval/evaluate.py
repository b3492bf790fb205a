"""The eval stage: greedy pass@1, sampled pass@k / maj@k, format, length and reflection, per domain.

    r1zero eval --config configs/tiny.yaml --model runs/tiny/grpo --data runs/tiny/data \\
        --out runs/tiny/eval --baseline runs/tiny/pretrain --curves runs/tiny/grpo/metrics.jsonl

For every eval-split problem of the configured domains (``eval.domains``; ``eval.n_problems``
of them after a seeded shuffle, or all): one greedy completion (pass@1) and ``eval.n_samples``
sampled ones at ``eval.temperature`` (unbiased pass@k with k = ``eval.k``, maj@k, mean@n).
Answers are extracted with the R1-Zero template and checked by :func:`r1zero.verify.verify_many`.
Every rate comes with a percentile-bootstrap CI over problems (``eval.bootstrap`` resamples).

With ``--baseline`` (a model dir, or the output dir of an earlier ``r1zero eval``) the same
problems are scored for the baseline and every metric gets a paired-bootstrap difference.

Named benchmarks (``eval.benchmarks``; the data stage imported each whole into ``bench/<name>/``)
are evaluated whole in the same generation pass (``eval.n_problems`` does not cut them) and
reported per name under ``"benchmarks"``: rows, every rate with its CI, lengths, and with a
baseline its rates and the paired differences. maj@k votes are grouped by the verifier's answer
equivalence (``1/2`` and ``0.5`` are one vote). Prompts are rendered with the model tokenizer's
chat template when ``data.chat_template`` is set (:func:`r1zero.template.prompt_renderer`).

Outputs in ``--out``: ``metrics.json`` (nested), ``kfp_metrics.json`` (flat name -> float for KFP),
``per_problem.jsonl`` (one record per problem with its greedy completion; lets a later eval pair
against this one) and ``report.html`` (self-contained, see :mod:`r1zero.eval.report`).
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from r1zero import store
from r1zero.errors import UserError
from r1zero.eval import metrics as M
from r1zero.progress import progress

BATCH = 32  # prompts per generation call (sampled calls hold BATCH * n_samples rows)
RATE_KEYS = ("pass@1", "pass@k", "maj@k", "mean@n", "format_rate", "format_rate_sampled", "reflection_rate",
             "truncated_rate")


# ---------------------------------------------------------------------------------------------
# problems


def select_problems(rows: Sequence[dict], domains: Sequence[str], n_problems: int | None, seed: int) -> list[dict]:
    """Rows of ``domains`` with a gold answer; a seeded sample of ``n_problems`` when given."""
    keep = [r for r in rows if r.get("domain") in set(domains) and str(r.get("answer", "")).strip()]
    if n_problems is not None and n_problems < len(keep):
        keep = random.Random(seed).sample(keep, n_problems)
    return keep


def selection_counts(rows: Sequence[dict], items: Sequence[dict], domains: Sequence[str]) -> dict:
    """Where every eval-split row went: ``in == evaluated + sum(not_evaluated)``."""
    other = sum(r.get("domain") not in set(domains) for r in rows)
    no_answer = sum(r.get("domain") in set(domains) and not str(r.get("answer", "")).strip() for r in rows)
    return {"in": len(rows), "evaluated": len(items),
            "not_evaluated": {"domain_not_evaluated": other, "no_gold_answer": no_answer,
                              "not_sampled": len(rows) - other - no_answer - len(items)}}


# ---------------------------------------------------------------------------------------------
# generation


def generate(model, tokenizer, prompts: Sequence[str], n: int, temperature: float, max_new_tokens: int,
             seed: int, desc: str) -> list[list[tuple[str, int, bool]]]:
    """``n`` completions per prompt as ``(text, n_tokens, truncated)``; greedy when ``temperature == 0``."""
    import torch

    from r1zero.generate import sample

    gen = torch.Generator().manual_seed(seed)
    drop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out: list[list[tuple[str, int, bool]]] = []
    for i in progress(range(0, len(ids), BATCH), desc=desc, unit="batch"):
        chunk = ids[i:i + BATCH]
        rows = [p for p in chunk for _ in range(n)]
        res = sample(model, rows, max_new_tokens, temperature, 1.0, eos_id=tokenizer.eos_token_id,
                     pad_id=tokenizer.pad_token_id, generator=gen)
        texts = [tokenizer.decode([t for t in c if t not in drop], skip_special_tokens=False)
                 for c in res.completion_ids]
        lens = [len(c) for c in res.completion_ids]
        for j in range(len(chunk)):
            sl = slice(j * n, (j + 1) * n)
            out.append(list(zip(texts[sl], lens[sl], res.truncated[sl])))
    return out


# ---------------------------------------------------------------------------------------------
# scoring (pure given the verifier)


def answer_equivalence(item: dict) -> Callable[[str, str], bool] | None:
    """The verifier's equivalence of two answers to ``item`` (math, cross); None = string equality."""
    from r1zero.verify import verify_cross, verify_math

    if item.get("domain") == "math":
        return lambda a, b: verify_math(a, b).correct
    if item.get("domain") == "cross":
        return lambda a, b: verify_cross(a, b).correct
    return None  # code: answers are programs, judged by running them; votes by normalised text


def score_problems(items: Sequence[dict], greedy: Sequence[tuple[str, int, bool]],
                   sampled: Sequence[Sequence[tuple[str, int, bool]]], k: int, strict_format: bool,
                   keywords: Sequence[str], verify_many: Callable | None = None) -> list[dict]:
    """One record per problem from its greedy and sampled completions.

    ``verify_many(items, answers) -> [Verdict]`` defaults to :func:`r1zero.verify.verify_many`.
    """
    from r1zero.template import extract_answer, format_ok

    if verify_many is None:
        from r1zero.verify import verify_many
    n = len(sampled[0]) if sampled else 0
    k = min(k, n) if n else k
    flat_items, flat_answers = [], []
    for item, g, ss in zip(items, greedy, sampled):
        for text, _, _ in [g, *ss]:
            flat_items.append(item)
            flat_answers.append(extract_answer(text))
    verdicts = verify_many(flat_items, flat_answers) if flat_items else []
    recs = []
    per = 1 + n
    for i, (item, g, ss) in enumerate(zip(items, greedy, sampled)):
        v = verdicts[i * per:(i + 1) * per]
        answers = flat_answers[i * per:(i + 1) * per]
        s_correct = [bool(x.correct) for x in v[1:]]
        c = sum(s_correct)
        texts = [t for t, _, _ in ss]
        rec = {
            "id": str(item.get("id", i)), "domain": item.get("domain", ""),
            "pass@1": float(v[0].correct), "status": v[0].status,
            "answer": answers[0], "gold": str(item.get("answer", "")), "completion": g[0],
            "format_rate": float(format_ok(g[0], strict=strict_format)),
            "reflection_greedy": float(M.has_reflection(g[0], keywords)),
            "length": g[1], "truncated": float(g[2]),
            "n": n, "c": c,
            "pass@k": M.pass_at_k(n, c, k) if n else float("nan"),
            "maj@k": float(M.maj_at_k(answers[1:], s_correct, k, answer_equivalence(item))) if n else float("nan"),
            "mean@n": c / n if n else float("nan"),
            "format_rate_sampled": float(np.mean([format_ok(t, strict=strict_format) for t in texts])) if n else 0.0,
            "reflection_rate": float(np.mean([M.has_reflection(t, keywords) for t in texts])) if n else 0.0,
            "truncated_rate": float(np.mean([tr for _, _, tr in ss])) if n else float(g[2]),
            "sample_lengths": [ln for _, ln, _ in ss],
        }
        if item.get("benchmark"):
            rec["benchmark"] = item["benchmark"]
        recs.append(rec)
    return recs


def aggregate(recs: Sequence[dict], n_boot: int, seed: int) -> dict:
    """Bootstrap estimates of every rate plus length summaries, for one set of problems."""
    out: dict = {"n_problems": len(recs)}
    for key in RATE_KEYS:
        vals = [r[key] for r in recs if not (isinstance(r[key], float) and np.isnan(r[key]))]
        out[key] = M.bootstrap_ci(vals, n_boot=n_boot, seed=seed).as_dict()
    out["length_greedy"] = M.length_summary([r["length"] for r in recs])
    out["length_sampled"] = M.length_summary([x for r in recs for x in r["sample_lengths"]])
    return out


def by_domain(recs: Sequence[dict], n_boot: int, seed: int) -> dict:
    doms = sorted({r["domain"] for r in recs})
    return {"overall": aggregate(recs, n_boot, seed),
            "by_domain": {d: aggregate([r for r in recs if r["domain"] == d], n_boot, seed) for d in doms}}


def compare(recs: Sequence[dict], base: Sequence[dict], n_boot: int, seed: int) -> dict:
    """Model minus baseline for every rate: paired bootstrap on the problems both scored."""
    b_by_id = {r["id"]: r for r in base}
    pairs = [(r, b_by_id[r["id"]]) for r in recs if r["id"] in b_by_id]
    if not pairs:
        raise UserError("baseline shares no problem ids with this evaluation (different data?)")

    def diffs(subset):
        out = {"n_paired": len(subset)}
        for key in RATE_KEYS:
            a = [x[key] for x, y in subset if not np.isnan(x[key]) and not np.isnan(y[key])]
            b = [y[key] for x, y in subset if not np.isnan(x[key]) and not np.isnan(y[key])]
            out[key] = M.paired_bootstrap_diff(a, b, n_boot=n_boot, seed=seed).as_dict()
        return out

    doms = sorted({r["domain"] for r, _ in pairs})
    return {"overall": diffs(pairs), "by_domain": {d: diffs([p for p in pairs if p[0]["domain"] == d]) for d in doms}}


def by_benchmark(recs: Sequence[dict], base: Sequence[dict] | None, rows: dict, n_boot: int, seed: int) -> dict:
    """``{NAME: {"rows", rates + lengths, ["baseline", "delta"]}}`` for the named benchmarks' records."""
    out = {}
    for name, counts in rows.items():
        mine = [r for r in recs if r.get("benchmark") == name]
        block = {"rows": counts, **aggregate(mine, n_boot, seed)}
        if base is not None:
            ids = {r["id"] for r in mine}
            theirs = [r for r in base if r["id"] in ids]
            block["baseline"] = aggregate(theirs, n_boot, seed)
            block["delta"] = compare(mine, theirs, n_boot, seed)["overall"] if theirs else None
        out[name] = block
    return out


def flat_metrics(doc: dict) -> dict[str, float]:
    """KFP-friendly ``name -> float`` view of ``metrics.json`` (benchmarks as ``bench/NAME/...``)."""
    out: dict[str, float] = {"accuracy": doc["overall"]["pass@1"]["mean"]}

    def put(prefix, block):
        for key in RATE_KEYS:
            if key in block:
                out[f"{prefix}{key}"] = block[key]["mean"]
        if "length_sampled" in block:
            out[f"{prefix}length_mean"] = block["length_sampled"]["mean"]

    put("", doc["overall"])
    for d, block in doc["by_domain"].items():
        put(f"{d}/", block)
    if "delta" in doc:
        put("delta/", doc["delta"]["overall"])
        for d, block in doc["delta"]["by_domain"].items():
            put(f"delta/{d}/", block)
    for name, block in doc.get("benchmarks", {}).items():
        put(f"bench/{name}/", block)
        out[f"bench/{name}/n"] = block["n_problems"]
        if block.get("delta"):
            put(f"delta/bench/{name}/", block["delta"])
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


# ---------------------------------------------------------------------------------------------
# stage


def evaluate_model(cfg, model_uri: str, items: list[dict], label: str) -> list[dict]:
    """Generate and score every problem with the model at ``model_uri``."""
    import torch

    from r1zero.model import load_causal_lm
    from r1zero.template import prompt_renderer
    from r1zero.train.dist import device_for, read_env

    torch.manual_seed(cfg.seed)
    model, tok = load_causal_lm(model_uri)
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise UserError(f"{model_uri}: tokenizer needs eos and pad tokens")
    model.to(device_for(read_env()))  # cuda:LOCAL_RANK on a GPU node (untested here), else CPU
    render = prompt_renderer(tok, cfg.data.chat_template)
    prompts = [render(r["prompt"]) for r in items]
    e = cfg.eval
    greedy = [g[0] for g in generate(model, tok, prompts, 1, 0.0, e.max_new_tokens, cfg.seed, f"{label} greedy")]
    sampled = generate(model, tok, prompts, e.n_samples, e.temperature, e.max_new_tokens, cfg.seed + 1,
                       f"{label} sampled")
    from r1zero.sandbox.client import verify_many_for

    return score_problems(items, greedy, sampled, e.k, cfg.grpo.reward.format_mode == "strict",
                          cfg.grpo.reflection_keywords, verify_many=verify_many_for(cfg.sandbox))


def load_benchmarks(cfg, data_uri: str) -> tuple[list[dict], dict]:
    """Every row of every named benchmark in the data artifact (whole), tagged with its name.

    Returns ``(items, {NAME: {"in", "evaluated", "not_evaluated"}})``; rows without a gold answer
    (generic ``general`` rows) are counted, not evaluated.
    """
    from r1zero.data.shards import bench_split, read_rows

    items, counts = [], {}
    for b in cfg.eval.benchmarks:
        try:
            rows = read_rows(data_uri, bench_split(b.name))
        except UserError:
            raise UserError(f"data {data_uri}: no benchmark {b.name!r} (was the data stage run with this "
                            "eval.benchmarks entry?)") from None
        keep = [{**r, "benchmark": b.name} for r in rows if str(r.get("answer", "")).strip()]
        items += keep
        counts[b.name] = {"in": len(rows), "evaluated": len(keep),
                          "not_evaluated": {"no_gold_answer": len(rows) - len(keep)}}
    return items, counts


def _load_baseline(cfg, baseline_uri: str, items: list[dict]) -> tuple[list[dict], str]:
    root = Path(store.materialize(baseline_uri))
    if (root / "config.json").is_file():
        return evaluate_model(cfg, baseline_uri, items, "baseline"), "model"
    per = root / "per_problem.jsonl" if root.is_dir() else root
    if per.is_file() and per.name == "per_problem.jsonl":
        return [json.loads(x) for x in per.read_text(encoding="utf-8").splitlines() if x.strip()], "eval"
    raise UserError(f"baseline {baseline_uri}: neither a model dir (config.json) nor an eval output "
                    "(per_problem.jsonl)")


def run_eval(cfg, model_uri: str, data_uri: str, out_uri: str, baseline_uri: str | None = None,
             curves: Sequence[str] | None = None) -> dict:
    """Evaluate ``model_uri`` on the eval split of ``data_uri``; publish results to ``out_uri``.

    Returns the flat metrics (``kfp_metrics.json``), whose ``accuracy`` is the greedy pass@1.
    """
    from r1zero.data.shards import read_rows

    e = cfg.eval
    rows = read_rows(data_uri, "eval")
    items = select_problems(rows, e.domains, e.n_problems, cfg.seed)
    bench_items, bench_rows = load_benchmarks(cfg, data_uri)
    if not items and not bench_items:
        raise UserError(f"data {data_uri}: no eval problems in domains {', '.join(e.domains)}")
    all_recs = evaluate_model(cfg, model_uri, items + bench_items, "model")
    recs = [r for r in all_recs if "benchmark" not in r] or all_recs  # headline: the eval split
    doc = {"model": str(model_uri), "data": str(data_uri), "config_hash": cfg.hash(), "seed": cfg.seed,
           "k": min(e.k, e.n_samples), "n_samples": e.n_samples, "temperature": e.temperature,
           "max_new_tokens": e.max_new_tokens, "rows": selection_counts(rows, items, e.domains),
           **by_domain(recs, e.bootstrap, cfg.seed)}
    base_recs = all_base = None
    if baseline_uri:
        all_base, kind = _load_baseline(cfg, baseline_uri, items + bench_items)
        base_recs = [r for r in all_base if "benchmark" not in r] or all_base
        doc["baseline"] = {"uri": str(baseline_uri), "kind": kind, **by_domain(base_recs, e.bootstrap, cfg.seed)}
        doc["delta"] = compare(recs, base_recs, e.bootstrap, cfg.seed)
    if bench_rows:
        doc["benchmarks"] = by_benchmark(all_recs, all_base, bench_rows, e.bootstrap, cfg.seed)
    flat = flat_metrics(doc)
    doc["accuracy"] = flat["accuracy"]

    series, events = {}, []
    if curves:
        from r1zero.insight.detect import detect_all, load_metrics

        for i, path in enumerate(curves):
            s, _ = load_metrics(path)
            series.update({(f"{i}:{r}" if len(curves) > 1 else r, m): v for (r, m), v in s.items()})
        events = detect_all(series, cfg.insight)
        doc["curves"] = {"files": [str(c) for c in curves], "events": events}

    from r1zero.eval.report import render_report

    html = render_report(doc, recs, base_recs, series, events)
    with tempfile.TemporaryDirectory(prefix="r1zero-eval-") as tmp:
        d = Path(tmp)
        store.atomic_write_text(d / "metrics.json", json.dumps(doc, indent=1, sort_keys=True) + "\n")
        store.atomic_write_text(d / "kfp_metrics.json", json.dumps(flat, indent=1, sort_keys=True) + "\n")
        store.atomic_write_text(d / "per_problem.jsonl",
                                "".join(json.dumps(r, sort_keys=True) + "\n" for r in all_recs))
        store.atomic_write_text(d / "report.html", html)
        store.publish(d, out_uri)
    return flat
