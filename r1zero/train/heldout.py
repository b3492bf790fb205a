"""Held-out greedy accuracy of a freshly pretrained base model (GRPO's starting point).

    acc = heldout_accuracy(model, tokenizer, eval_rows, cfg)   # {"accuracy": {"math": 0.31, ...}, ...}

For each of ``cfg.eval.domains`` the first ``cfg.pretrain.heldout_per_domain`` eval-split items
are rendered with the R1-Zero template (:func:`r1zero.template.render_prompt`), decoded greedily
(:func:`r1zero.generate.sample`, temperature 0) and the ``<answer>`` content is checked by the
verifier (:func:`r1zero.verify.verify`: math by equivalence, code by running it). Also reported:
the format rate (lenient R1-Zero format) and the verdict status counts.
"""

from __future__ import annotations

from collections import Counter

import torch

from r1zero.progress import progress

BATCH = 32  # prompts decoded together (KV-cached); bounded memory on CPU


def _verifier():
    try:
        from r1zero.verify import verify

        return verify, "r1zero.verify"
    except ImportError:  # verifier not built yet: exact match of the normalised answer
        def exact(item, predicted, timeout_s=2.0):
            from types import SimpleNamespace

            ok = predicted is not None and predicted.strip() == str(item["answer"]).strip()
            return SimpleNamespace(correct=ok, status="exact" if ok else "wrong", detail="")

        return exact, "exact-match"


def heldout_accuracy(model, tokenizer, rows: list[dict], cfg) -> dict:
    from r1zero.generate import sample
    from r1zero.template import extract_answer, format_ok, prompt_renderer

    render_prompt = prompt_renderer(tokenizer, cfg.data.chat_template)  # a base's chat template when asked
    n = cfg.pretrain.heldout_per_domain
    verify, verifier_name = _verifier()
    by_domain: dict[str, list[dict]] = {d: [] for d in cfg.eval.domains}
    for r in rows:
        d = r.get("domain")
        if d in by_domain and len(by_domain[d]) < n:
            by_domain[d].append(r)
    model.eval()
    accuracy, fmt, counts, statuses = {}, {}, {}, {}
    for domain, items in by_domain.items():
        if not items:
            continue
        correct = formatted = 0
        status = Counter()
        for i in progress(range(0, len(items), BATCH), desc=f"heldout {domain}", unit="batch"):
            chunk = items[i:i + BATCH]
            prompts = [tokenizer(render_prompt(r["prompt"]), add_special_tokens=False)["input_ids"] for r in chunk]
            with torch.no_grad():
                out = sample(model, prompts, cfg.pretrain.heldout_max_new_tokens, temperature=0.0,
                             eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
            for row, ids in zip(chunk, out.completion_ids, strict=True):
                text = tokenizer.decode(ids, skip_special_tokens=False)
                v = verify(row, extract_answer(text))
                correct += bool(v.correct)
                formatted += bool(format_ok(text, strict=False))
                status[v.status] += 1
        accuracy[domain] = correct / len(items)
        fmt[domain] = formatted / len(items)
        counts[domain] = len(items)
        statuses[domain] = dict(status)
    return {"accuracy": accuracy, "format_rate": fmt, "n": counts, "status": statuses, "verifier": verifier_name,
            "max_new_tokens": cfg.pretrain.heldout_max_new_tokens, "decoding": "greedy"}
