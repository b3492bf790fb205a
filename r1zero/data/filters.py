"""Quality filtering: rule checks plus a [0, 1] quality score with a configurable threshold.

Rules (first failing rule is the quarantine reason): ``empty_prompt``, ``missing_answer``
(verifiable domains need a reference answer), ``too_short`` / ``too_long`` (``filter.min_chars``,
``filter.max_chars`` on prompt + solution), ``control_chars`` (C0/C1 control characters other than
newline/tab, or U+FFFD from a lossy decode), ``bad_difficulty`` (outside 1..10), then
``low_quality`` when :func:`quality_score` < ``filter.min_score``.

The score is a product of heuristic factors in the spirit of Gopher's quality rules (Rae et al.
2021, arXiv 2112.11446, sec. A.1.1): the fraction of alphanumeric characters, the fraction of
distinct words, the longest run of one repeated character and the mean word length. Each factor
is 1 for ordinary text, so the score only drops for junk.

    python -c "from r1zero.data.filters import quality_score; print(quality_score('!!!! ???? !!!!'))"
"""

from __future__ import annotations

import re

from r1zero.data.schema import DOMAINS, VERIFIABLE

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
_NON_ALNUM_RE = re.compile(r"[\W_]+")  # \w minus "_" = letters and digits (any script)
_ASCII_NON_ALNUM = bytes(c for c in range(128) if not chr(c).isalnum())
_RUN_RE = re.compile(r"(.)\1{9,}", re.DOTALL)  # 10+ of the same character


def quality_score(text: str) -> float:
    """Heuristic text quality in [0, 1]; 1 for normal prose, math and code."""
    words = text.split()
    n_chars = sum(map(len, words))  # non-whitespace characters
    if not n_chars:
        return 0.0
    # Gopher requires >= 80% of words to contain a letter; math/code have many symbols, so we ask
    # for >= 40% alphanumeric characters before penalising.
    if text.isascii():  # fast path: bytes.translate deletes the non-alphanumerics in C
        alnum = len(text.encode("ascii").translate(None, _ASCII_NON_ALNUM)) / n_chars
    else:
        alnum = len(_NON_ALNUM_RE.sub("", text)) / n_chars
    f_alnum = min(1.0, alnum / 0.4)
    # Repetition: fewer than half the words distinct (for texts of 8+ words) is suspicious.
    f_unique = min(1.0, (len(set(words)) / len(words)) / 0.5) if len(words) >= 8 else 1.0
    longest = max(len(m.group(0)) for m in _RUN_RE.finditer(text)) if _RUN_RE.search(text) else 1
    f_run = 1.0 if longest < 10 else 10.0 / longest
    # Gopher: mean word length between 3 and 10 characters; we allow 1..15 (numbers, symbols).
    mean_len = n_chars / len(words)
    f_len = 1.0 if mean_len <= 15 else 15.0 / mean_len
    return round(f_alnum * f_unique * f_run * f_len, 6)


def check(row: dict, min_chars: int, max_chars: int, min_score: float) -> tuple[str, str] | None:
    """``(reason, detail)`` for the first rule ``row`` breaks, or None if it passes."""
    prompt = row["prompt"]
    if row["domain"] not in DOMAINS:
        return "bad_domain", f"domain {row['domain']!r} not in {DOMAINS}"
    if not prompt.strip():
        return "empty_prompt", "prompt is empty"
    if row["domain"] in VERIFIABLE and not str(row["answer"]).strip():
        return "missing_answer", f"{row['domain']} row without a reference answer"
    size = len(prompt) + len(row["solution"])
    if size < min_chars:
        return "too_short", f"{size} chars < min_chars {min_chars}"
    if size > max_chars:
        return "too_long", f"{size} chars > max_chars {max_chars}"
    if _CONTROL_RE.search(prompt + row["answer"] + row["solution"]):  # one scan; name the field if found
        for field in ("prompt", "answer", "solution"):
            m = _CONTROL_RE.search(row[field])
            if m:
                return "control_chars", f"{field} contains U+{ord(m.group(0)):04X}"
    if not 1 <= row["difficulty"] <= 10:
        return "bad_difficulty", f"difficulty {row['difficulty']} not in 1..10"
    score = quality_score(prompt + " " + row["solution"])
    if score < min_score:
        return "low_quality", f"quality score {score:.3f} < min_score {min_score}"
    return None
