"""Verifiable rewards for GRPO rollouts: accuracy, format, DAPO overlong shaping.

Every term is a number per completion; the total is

    R = w_acc * accuracy + w_fmt * format + overlong (+ three-level, see three_level.py)

- ``accuracy``: 1 if the text inside ``<answer> </answer>`` is judged correct by
  :func:`r1zero.verify.verify` (math by equivalence, code by running it in the sandbox, cross-domain
  by normalised/numeric comparison), else 0. No extractable answer -> 0.
- ``format``: 1 if :func:`r1zero.template.format_ok` accepts the response (``strict``: exactly one
  think block then one answer block and nothing after; ``lenient``: both tag pairs present in order),
  else 0.
- ``overlong`` (DAPO, arXiv 2503.14476 eq. 13): with L_max = max_new_tokens and buffer L_c,
  0 if |o| <= L_max - L_c; ((L_max - L_c) - |o|) / L_c inside the buffer; -1 when truncated.

The response given to the checks is ``"<think>" + completion`` because the R1-Zero prompt ends with
``Assistant: <think>``: the opening tag belongs to the prompt, the model writes the rest.

Verdicts are memoised per (item id, extracted answer) in a bounded LRU: G samples of one prompt
often agree, and a code verdict costs a sandbox process. ``sandbox_error`` verdicts (e.g. the
sandbox service was unreachable) are not memoised: they say nothing about the answer.

Code runs in this process's sandbox, or through the sandbox service when ``sandbox`` (the config's
:class:`r1zero.config.SandboxConfig`) has a ``url`` (:mod:`r1zero.sandbox.client`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

THINK_PREFIX = "<think>"  # the prompt's last tokens (r1zero.template.render_prompt)


def overlong_penalty(length: int, truncated: bool, max_len: int, buffer: int) -> float:
    """DAPO soft overlong punishment for one completion of ``length`` tokens."""
    if truncated or length > max_len:
        return -1.0
    safe = max_len - buffer
    if length <= safe:
        return 0.0
    return (safe - length) / buffer


@dataclass
class RewardResult:
    total: list[float]
    terms: dict[str, list[float]]  # per reward function, unweighted
    correct: list[bool]
    formatted: list[bool]
    answers: list[str | None]


class RewardScorer:
    """Scores completions against their items; holds the verdict cache."""

    def __init__(self, cfg, max_new_tokens: int, verify_many_fn: Callable | None = None,
                 extract_fn: Callable | None = None, format_fn: Callable | None = None,
                 timeout_s: float = 2.0, cache_size: int = 200_000, sandbox=None):
        self.cfg = cfg  # r1zero.config.RewardConfig
        self.max_new_tokens = max_new_tokens
        if verify_many_fn is None:
            from r1zero.sandbox.client import verify_many_for

            verify_many_fn = verify_many_for(sandbox)
        if extract_fn is None or format_fn is None:
            from r1zero import template

            extract_fn = extract_fn or template.extract_answer
            format_fn = format_fn or template.format_ok
        self.verify_many_fn, self.extract_fn, self.format_fn = verify_many_fn, extract_fn, format_fn
        self.timeout_s = timeout_s
        self.sandbox_url = getattr(sandbox, "url", None)
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()  # LRU: oldest first
        self._cache_size = cache_size
        self.verify_calls = 0

    def attach_metrics(self, tel) -> None:
        """Serve the sandbox client's latency and error series (:mod:`r1zero.sandbox.client`) on the
        rank's telemetry endpoint; no-op without a service or without telemetry."""
        registry = getattr(getattr(tel, "metrics", None), "registry", None)
        if self.sandbox_url and registry is not None:
            from r1zero.sandbox.client import REGISTRY

            registry.register(REGISTRY)

    @staticmethod
    def _key(item: dict, answer: str) -> tuple[str, str]:
        return (f"{item.get('id', '')}\x00{item.get('answer', '')}\x00{item.get('meta', '')}", answer)

    def correct_many(self, items: Sequence[dict], answers: Sequence[str | None]) -> list[bool]:
        """Verdicts for (item, answer) pairs; uncached pairs go to ``verify_many`` in one batch."""
        known: dict[tuple[str, str], bool] = {}  # this call's verdicts: eviction cannot lose them
        todo: dict[tuple[str, str], tuple[dict, str]] = {}
        for item, ans in zip(items, answers):
            if ans is not None:
                k = self._key(item, ans)
                if k in self._cache:
                    self._cache.move_to_end(k)
                    known[k] = self._cache[k]
                elif k not in known:
                    todo[k] = (item, ans)
        if todo:
            keys = list(todo)
            verdicts = self.verify_many_fn([todo[k][0] for k in keys], [todo[k][1] for k in keys],
                                           timeout_s=self.timeout_s)
            self.verify_calls += len(keys)
            for k, v in zip(keys, verdicts):
                known[k] = bool(v.correct)
                if getattr(v, "status", "") != "sandbox_error":
                    self._cache[k] = known[k]
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return [False if a is None else known[self._key(it, a)] for it, a in zip(items, answers)]

    def score(self, items: Sequence[dict], texts: Sequence[str], lengths: Sequence[int],
              truncated: Sequence[bool]) -> RewardResult:
        strict = self.cfg.format_mode == "strict"
        answers, formatted, overlong = [], [], []
        for text, n, tr in zip(texts, lengths, truncated):
            response = THINK_PREFIX + text
            answers.append(self.extract_fn(response))
            formatted.append(bool(self.format_fn(response, strict)))
            overlong.append(overlong_penalty(n, tr, self.max_new_tokens, self.cfg.overlong_buffer)
                            if self.cfg.overlong else 0.0)
        correct = self.correct_many(items, answers)
        acc = [float(c) for c in correct]
        fmt = [float(f) for f in formatted]
        total = [self.cfg.accuracy * a + self.cfg.format * f + o for a, f, o in zip(acc, fmt, overlong)]
        terms = {"accuracy": acc, "format": fmt}
        if self.cfg.overlong:
            terms["overlong"] = overlong
        return RewardResult(total, terms, correct, formatted, answers)
