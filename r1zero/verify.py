"""Answer verification per domain, reused as the GRPO accuracy reward and by the eval.

    from r1zero.verify import verify, verify_many
    verify({"domain": "math", "answer": "1/2", "meta": "{}"}, r"\\frac{1}{2}")   # Verdict(True, "correct", ...)
    verify_many(items, predictions, timeout_s=2.0)                              # batched, concurrent sandbox

``predicted`` is the already-extracted answer (``r1zero.template.extract_answer`` of a completion)
or None when the completion had none. :func:`verify` never raises: any failure becomes a Verdict.

- math: fast path first (normalised string, exact rational / 6-significant-digit numeric match, which
  is math-verify's own ``float_rounding=6``), then math-verify ``parse``/``verify`` (sympy) for
  symbolic answers. math-verify's timeout is SIGALRM-based and only works in the main thread; off
  the main thread it runs without one, so over-long or exponent-tower inputs are refused first
  (:func:`_too_complex`) because sympy big-integer work cannot be interrupted anyway.
- code ``predict_output``: the reference output is precomputed, so the check is a literal/normalised
  comparison, no process. ``find_input``: the candidate input is parsed as a Python literal (safe
  ``ast.literal_eval``, bounded size) and ``f(candidate)`` runs in :mod:`r1zero.sandbox`.
- cross: normalised text (case, punctuation, articles) or numeric comparison (units ignored).

Verdict statuses: ``correct``, ``wrong``, ``no_answer`` (None/empty prediction), ``unparseable``
(prediction not a number/expression/literal), ``too_complex``, ``runtime_error`` (f raised on the
candidate), ``timeout``, ``sandbox_error``, ``bad_item`` (the item itself is unusable, e.g. a
``general`` row), ``internal_error``.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

from r1zero.sandbox.runner import SandboxResult, run_code

REL_TOL = 1e-6  # math-verify's float_rounding=6 (math_verify.verify default), as a relative tolerance
MAX_ANSWER_CHARS = 300  # longer predictions are refused for symbolic checking (sympy cost)
MAX_LITERAL_CHARS = 2000  # bound on a literal parsed with ast.literal_eval (nesting / size)
SANDBOX_MEMORY_MB = 256
MAX_WORKERS = 4  # concurrent sandbox jobs in verify_many (each is one short process)
RESULT_MARKER = "__R1ZERO_RESULT__"
_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Verdict:
    correct: bool
    status: str
    detail: str = ""


def _ok(detail: str = "") -> Verdict:
    return Verdict(True, "correct", detail)


def _wrong(detail: str = "") -> Verdict:
    return Verdict(False, "wrong", detail)


# ---------------------------------------------------------------------------------------------
# normalisation and numbers (pure)

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([+-]?\d+(?:\.\d+)?)\s*\}\s*\{\s*([+-]?\d+(?:\.\d+)?)\s*\}")
_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:/[+-]?(?:\d+\.?\d*|\.\d+))?")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_LEADING_NUMBER_RE = re.compile(r"^\s*([+-]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-zA-Z%°µ/ ]*)\.?\s*$")


def _unbox(s: str) -> str:
    """Contents of the last ``\\boxed{...}`` (brace-balanced), else ``s``."""
    found = list(_BOXED_RE.finditer(s))
    if not found:
        return s
    m = found[-1]
    depth, i = 1, m.end()
    while i < len(s) and depth:
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        i += 1
    return s[m.end():i - 1] if depth == 0 else s


def normalize_math(s: str) -> str:
    """Cheap LaTeX clean-up: ``$``, ``\\boxed``, ``\\left``/``\\right``, spacing commands, ``\\frac{a}{b}``
    with numeric a, b -> ``a/b``, thousands separators, a trailing period."""
    s = _unbox(s.strip())
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\ ", " ").replace("\\displaystyle", "").strip()
    s = _FRAC_RE.sub(r"\1/\2", s)
    s = _FRAC_SHORT_RE.sub(r"\1/\2", s)
    s = s.rstrip(".").strip()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return " ".join(s.split())


def parse_number(s: str) -> Fraction | None:
    """An exact rational for a plain number, decimal, scientific literal or ``a/b``; else None."""
    t = normalize_math(s).replace(" ", "")
    if t.startswith("(") and t.endswith(")"):
        t = t[1:-1]
    if not _NUMBER_RE.fullmatch(t):
        return None
    try:
        if "/" in t:
            num, den = t.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(gold: Fraction, pred: Fraction, rel_tol: float = REL_TOL) -> bool:
    """Exact for two integers; otherwise equal within ``rel_tol`` of ``max(1, |gold|)``."""
    if gold == pred:
        return True
    if gold.denominator == 1 and pred.denominator == 1:
        return False
    return abs(gold - pred) <= Fraction(rel_tol) * max(1, abs(gold))


def _too_complex(s: str) -> bool:
    """Inputs sympy may spend unbounded, uninterruptible time on (huge powers, factorial towers)."""
    if len(s) > MAX_ANSWER_CHARS:
        return True
    if len(re.findall(r"\^|\*\*", s)) > 3 or re.search(r"(\^|\*\*)\s*\{?\s*\(?\s*\d{4,}", s):
        return True
    return bool(re.search(r"\d{3,}\s*!|!\s*!", s))


# ---------------------------------------------------------------------------------------------
# math


def _mv_parse(text: str, timeout: int | None):
    from math_verify import parse

    # A bare answer parses best as LaTeX ("$1+x$" -> x + 1; plain "1+x" would extract "1").
    got = parse(f"${text}$", parsing_timeout=timeout)
    return got if got else parse(text, parsing_timeout=timeout)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _math_symbolic(gold: str, pred: str, timeout: int | None) -> Verdict:
    from math_verify import verify as mv_verify

    gold_p = _mv_parse(gold, timeout)
    if not gold_p:
        return Verdict(False, "bad_item", f"reference answer {gold!r} does not parse")
    pred_p = _mv_parse(pred, timeout)
    if not pred_p:
        return Verdict(False, "unparseable", f"{pred!r} is not a math expression")
    if mv_verify(gold_p, pred_p, timeout_seconds=timeout):
        return _ok("symbolic")
    return _wrong(f"{pred_p[-1]} != {gold_p[-1]}")


_WORD_RE = re.compile(r"[A-Za-z]{2,}(?:[ '-][A-Za-z]+)*")
# multi-letter golds that are math, not words (sympy would read "no1" as n*o*1 == "no")
_MATH_WORDS = {"pi", "infty", "inf", "infinity", "oo", "nan"}


def verify_math(gold: str, pred: str, timeout_s: float = 2.0) -> Verdict:
    g, p = normalize_math(gold), normalize_math(pred)
    if not p:
        return Verdict(False, "no_answer", "empty answer")
    if g == p:
        return _ok("exact")
    if _WORD_RE.fullmatch(g) and g.lower() not in _MATH_WORDS:  # yes/no/true/false-style answers
        return _ok("word") if normalize_text(g) == normalize_text(p) else _wrong(f"{p!r} != {g!r}")
    gn, pn = parse_number(g), parse_number(p)
    if gn is not None and pn is not None:
        return _ok("numeric") if numbers_equal(gn, pn) else _wrong(f"{p} != {g}")
    if _too_complex(p) or _too_complex(g):
        return Verdict(False, "too_complex", f"answer longer than {MAX_ANSWER_CHARS} chars or with huge powers")
    # math-verify's SIGALRM timeout only works on the main thread (signal.signal raises elsewhere);
    # TRL's accuracy_reward (trl/rewards/accuracy_rewards.py) makes the same choice.
    timeout = None
    if threading.current_thread() is threading.main_thread():
        timeout = max(1, round(timeout_s))
    else:
        for name in ("math_verify.parser", "math_verify.grader"):  # "timeout disabled" warnings
            logging.getLogger(name).setLevel(logging.ERROR)
    return _math_symbolic(g, p, timeout)


# ---------------------------------------------------------------------------------------------
# code


def _literal(text: str):
    """``ast.literal_eval`` bounded in size; raises ValueError when it is not a literal."""
    if len(text) > MAX_LITERAL_CHARS:
        raise ValueError(f"longer than {MAX_LITERAL_CHARS} chars")
    try:
        return ast.literal_eval(text.strip())
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as err:
        raise ValueError(str(err) or type(err).__name__) from None


_WORD_LITERALS = {"true": True, "false": False, "none": None, "null": None}


def _as_value(v):
    """A Python value for a reference or predicted output: literals are parsed, other text kept."""
    if not isinstance(v, str):
        return v
    try:
        return _literal(v)
    except ValueError:
        s = v.strip().strip("`").strip()
        return _WORD_LITERALS.get(s.lower(), s)


def _canon(v):
    """Compare-friendly form: tuples and lists alike, ints and integral floats alike."""
    if isinstance(v, list | tuple):
        return [_canon(x) for x in v]
    if isinstance(v, dict):
        return {repr(_canon(k)): _canon(x) for k, x in v.items()}
    if isinstance(v, set | frozenset):
        return sorted(repr(_canon(x)) for x in v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def values_equal(expected, predicted) -> bool:
    """Output equality for code answers (``expected`` a value or its repr, ``predicted`` text)."""
    e, p = _canon(_as_value(expected)), _canon(_as_value(predicted))
    if isinstance(e, bool) or isinstance(p, bool):
        return e is p
    if isinstance(e, int | float) and isinstance(p, int | float):
        return e == p or abs(e - p) <= 1e-9 * max(1.0, abs(e))
    return e == p


def _parse_candidate(pred: str, func: str) -> tuple[list, dict]:
    """Arguments for ``func`` from a predicted input: ``f(3)``, ``3``, ``(1, 2)`` or ``x = 3``."""
    text = pred.strip().strip("`").strip()
    text = re.sub(r"^[A-Za-z_]\w*\s*=\s*", "", text)  # "x = 3"
    if len(text) > MAX_LITERAL_CHARS:
        raise ValueError(f"longer than {MAX_LITERAL_CHARS} chars")
    try:
        node = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError) as err:
        raise ValueError(str(err) or type(err).__name__) from None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == func:
        args = [_literal(ast.unparse(a)) for a in node.args]
        kwargs = {k.arg: _literal(ast.unparse(k.value)) for k in node.keywords if k.arg}
        return args, kwargs
    return [_literal(text)], {}


def _harness(source: str, func: str, args: list, kwargs: dict) -> str:
    """The program run in the sandbox: the item's source, one call, the repr of the result."""
    return (f"{source}\n\n__r = {func}(*{args!r}, **{kwargs!r})\n"
            f"print({RESULT_MARKER!r} + repr(__r))\n")


def _result_of(res: SandboxResult) -> tuple[str | None, Verdict | None]:
    """The printed result repr, or the verdict explaining why there is none."""
    if res.status == "timeout":
        return None, Verdict(False, "timeout", f"f(candidate) ran past {res.seconds:.2f} s")
    if res.status == "error":
        last = res.stderr.strip().splitlines()[-1:] or [""]
        return None, Verdict(False, "runtime_error", last[0][:200])
    if res.status == "unavailable":  # the sandbox service could not be reached (r1zero.sandbox.client)
        return None, Verdict(False, "sandbox_error", res.stderr[:200])
    if res.status != "ok":
        return None, Verdict(False, "sandbox_error", f"sandbox status {res.status}")
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if not lines:
        return None, Verdict(False, "sandbox_error", "no result printed")
    return lines[-1][len(RESULT_MARKER):], None


def _meta(item: dict) -> dict:
    m = item.get("meta") or {}
    return json.loads(m) if isinstance(m, str) else dict(m)


class _RunCache:
    """Bounded LRU of sandbox results keyed by (program, timeout); timeouts are not cached (a busy
    machine may cause them, and a rerun can succeed), nor results of an unreachable service."""

    def __init__(self, size: int = _CACHE_SIZE):
        self.size, self.data, self.lock = size, OrderedDict(), threading.Lock()

    def run(self, program: str, timeout_s: float) -> SandboxResult:
        key = (program, timeout_s)
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        res = run_code(program, timeout_s=timeout_s, memory_mb=SANDBOX_MEMORY_MB)
        self._put(key, res)
        return res

    def _put(self, key: tuple, res: SandboxResult) -> None:
        if res.status not in ("timeout", "killed", "unavailable"):
            with self.lock:
                self.data[key] = res
                while len(self.data) > self.size:
                    self.data.popitem(last=False)

    def run_batch(self, programs: list[str], timeout_s: float, run_many) -> list[SandboxResult]:
        """Like :meth:`run` for many programs; the uncached ones go to ``run_many`` in one call
        (``run_many(programs, timeout_s=, memory_mb=) -> [SandboxResult]``, e.g. the service client)."""
        with self.lock:
            cached = {p: self.data[(p, timeout_s)] for p in programs if (p, timeout_s) in self.data}
        todo = [p for p in programs if p not in cached]
        if todo:
            for p, res in zip(todo, run_many(todo, timeout_s=timeout_s, memory_mb=SANDBOX_MEMORY_MB)):
                self._put((p, timeout_s), res)
                cached[p] = res
        return [cached[p] for p in programs]


_RUNS = _RunCache()


def _code_plan(item: dict, pred: str) -> tuple[Verdict | None, str | None, object]:
    """Either a final verdict, or (None, program to run, expected output)."""
    meta = _meta(item)
    kind = meta.get("kind", "predict_output")
    expected = meta.get("output", item.get("answer"))
    if kind == "predict_output":
        return (_ok("output") if values_equal(expected, pred) else _wrong(f"{pred!r} != {expected!r}")), None, None
    if kind != "find_input":
        return Verdict(False, "bad_item", f"unknown code kind {kind!r}"), None, None
    source, func = meta.get("source"), meta.get("func", "f")
    if not source or "output" not in meta:
        return Verdict(False, "bad_item", "find_input item without source/output"), None, None
    try:
        args, kwargs = _parse_candidate(pred, func)
    except ValueError as err:
        return Verdict(False, "unparseable", f"input {pred[:60]!r} is not a Python literal: {err}"), None, None
    return None, _harness(source, func, args, kwargs), meta["output"]


def _finish_code(res: SandboxResult, expected) -> Verdict:
    got, verdict = _result_of(res)
    if verdict is not None:
        return verdict
    return _ok("ran f(candidate)") if values_equal(expected, got) else _wrong(f"f(candidate) = {got} != {expected!r}")


# ---------------------------------------------------------------------------------------------
# cross-domain

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def normalize_text(s: str) -> str:
    s = normalize_math(s).lower()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"[^\w\s.%/-]", " ", s)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split()).strip(" .")


def _leading_number(s: str) -> Fraction | None:
    m = _LEADING_NUMBER_RE.match(normalize_math(s))
    if not m:
        return None
    num = m.group(1).replace(",", "") if "," in m.group(1) and _THOUSANDS_RE.match(m.group(1)) else m.group(1)
    try:
        return Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None


def verify_cross(gold: str, pred: str, rel_tol: float = REL_TOL) -> Verdict:
    g, p = normalize_text(gold), normalize_text(pred)
    if not p:
        return Verdict(False, "no_answer", "empty answer")
    if g == p:
        return _ok("text")
    gn, pn = _leading_number(gold), _leading_number(pred)
    if gn is None:
        gn = parse_number(gold)
    if pn is None:
        pn = parse_number(pred)
    if gn is not None and pn is not None:
        return _ok("numeric") if numbers_equal(gn, pn, rel_tol) else _wrong(f"{pred!r} != {gold!r}")
    return _wrong(f"{p!r} != {g!r}")


# ---------------------------------------------------------------------------------------------
# entry points


def _prepare(item: dict, predicted: str | None, timeout_s: float) -> tuple[Verdict | None, str | None, object]:
    """Everything but the sandbox run: (verdict, None, None) or (None, program, expected)."""
    if predicted is None or not str(predicted).strip():
        return Verdict(False, "no_answer", "no <answer> in the completion"), None, None
    pred = str(predicted)
    domain = item.get("domain")
    gold = str(item.get("answer", ""))
    if domain == "math":
        return verify_math(gold, pred, timeout_s), None, None
    if domain == "code":
        return _code_plan(item, pred)
    if domain == "cross":
        return verify_cross(gold, pred, float(_meta(item).get("rel_tol", REL_TOL))), None, None
    return Verdict(False, "bad_item", f"domain {domain!r} has no verifier"), None, None


def _safe(fn, *args) -> tuple:
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - the contract: verification never raises
        return Verdict(False, "internal_error", f"{type(err).__name__}: {str(err)[:200]}"), None, None


def verify(item: dict, predicted: str | None, timeout_s: float = 2.0) -> Verdict:
    """Check ``predicted`` (an extracted answer or None) against ``item``; never raises."""
    verdict, program, expected = _safe(_prepare, item, predicted, timeout_s)
    if verdict is not None:
        return verdict
    return _safe(lambda: (_finish_code(_RUNS.run(program, timeout_s), expected), None, None))[0]


def verify_many(items: list[dict], predictions: list[str | None], timeout_s: float = 2.0,
                max_workers: int = MAX_WORKERS, run_many=None) -> list[Verdict]:
    """:func:`verify` for a batch: identical sandbox programs run once, the rest concurrently.

    ``run_many`` (e.g. :meth:`r1zero.sandbox.client.SandboxClient.run_many`) runs the batch's
    programs elsewhere in one call instead of in this process's sandbox."""
    if len(items) != len(predictions):
        raise ValueError(f"verify_many: {len(items)} items but {len(predictions)} predictions")
    prepared = [_safe(_prepare, it, pr, timeout_s) for it, pr in zip(items, predictions)]
    programs = sorted({p for v, p, _ in prepared if v is None and p is not None})
    results: dict[str, SandboxResult | Exception] = {}
    if programs and run_many is not None:
        try:
            results = dict(zip(programs, _RUNS.run_batch(programs, timeout_s, run_many)))
        except Exception as err:  # noqa: BLE001 - the contract: verification never raises
            results = dict.fromkeys(programs, err)
    elif programs:
        def run_one(program: str):
            try:
                return _RUNS.run(program, timeout_s)
            except Exception as err:  # noqa: BLE001
                return err

        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(programs)))) as pool:
            results = dict(zip(programs, pool.map(run_one, programs)))
    out = []
    for verdict, program, expected in prepared:
        if verdict is not None:
            out.append(verdict)
            continue
        res = results[program]
        if isinstance(res, Exception):
            out.append(Verdict(False, "internal_error", f"{type(res).__name__}: {str(res)[:200]}"))
        else:
            out.append(_safe(lambda r=res, e=expected: (_finish_code(r, e), None, None))[0])
    return out
