"""Procedural code reverse-engineering items: small generated Python functions ``f``.

Two kinds (stored in ``meta`` as the VERIFY engineer's contract expects):

- ``predict_output``: "What does f(4) return?" -- the answer is ``repr(f(4))``.
- ``find_input``: "Find an x with f(x) == 14." -- the reference answer is an input that works;
  any input producing the output is correct (the verifier runs ``f`` in the sandbox).

``meta`` = ``{"kind", "source", "func": "f", "input", "output", "family"}``. Reference outputs are
computed by *running* the generated source in-process at generation time (our own trusted,
loop-bounded code) and cross-checked against the step trace that becomes the worked solution.

Shapes (lowest difficulty): affine chain (1), parity branch (1), accumulating loop (2), list
filter-sum (3), digit manipulation (4). Small ints at difficulty 1-2 keep prompts ~30 tokens.

    python -c "import random; from r1zero.data.gen_code import generate; print(generate(random.Random(0), 2))"
"""

from __future__ import annotations

import functools
import random

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@functools.lru_cache(maxsize=8192)
def _compiled(source: str, func: str):
    """The function ``func`` defined by ``source`` (cached: small families repeat their sources)."""
    ns: dict = {}
    exec(compile(source, "<r1zero-gen>", "exec"), {"__builtins__": {"range": range, "sum": sum, "len": len}}, ns)
    return ns[func]


def run_function(source: str, func: str, arg):
    """Run our generated ``source`` and call ``func(arg)`` (trusted, loop-bounded code only)."""
    return _compiled(source, func)(arg)


def _affine(rng: random.Random, difficulty: int):
    n_ops = 1 + min(difficulty, 3)
    lines, ops = ["def f(x):"], []
    for i in range(n_ops):
        op = rng.choice("+-*") if i else rng.choice("+-")
        k = rng.randint(2, 5) if op == "*" else rng.randint(1, 9 * difficulty)
        ops.append((op, k))
    lines.append(f"    y = x {ops[0][0]} {ops[0][1]}")
    for op, k in ops[1:-1]:
        lines.append(f"    y = y {op} {k}")
    lines.append(f"    return y {ops[-1][0]} {ops[-1][1]}")

    def trace_fn(x):
        steps, y = [], x
        for i, (op, k) in enumerate(ops):
            new = _OPS[op](y, k)
            steps.append(f"{'return' if i == len(ops) - 1 else 'y ='} {y} {op} {k} = {new}")
            y = new
        return y, steps

    return "\n".join(lines), trace_fn, lambda: rng.randint(0, 9 * difficulty), True


def _parity(rng: random.Random, difficulty: int):
    m = rng.choice([2, 3]) if difficulty > 1 else 2
    a, b, c = rng.randint(1, 5 * difficulty + 4), rng.randint(2, 2 + difficulty), rng.randint(1, 5 * difficulty + 4)
    src = f"def f(x):\n    if x % {m} == 0:\n        return x + {a}\n    return x * {b} - {c}"

    def trace_fn(x):
        if x % m == 0:
            return x + a, [f"{x} % {m} == 0, so return {x} + {a} = {x + a}"]
        return x * b - c, [f"{x} % {m} != 0, so return {x} * {b} - {c} = {x * b - c}"]

    return src, trace_fn, lambda: rng.randint(0, 12 * difficulty), True


def _loop(rng: random.Random, difficulty: int):
    k, s0 = rng.randint(1, 2 * difficulty + 2), rng.randint(0, 3 * difficulty + 2)
    op = rng.choice("+*") if difficulty >= 3 else "+"
    body = f"s = s {op} i" if op == "*" else f"s = s + i * {k}"
    start = 1 if op == "*" else rng.randint(0, 2)
    src = f"def f(n):\n    s = {s0 if op == '+' else max(s0, 1)}\n    for i in range({start}, n):\n        {body}\n    return s"

    def trace_fn(n):
        s = s0 if op == "+" else max(s0, 1)
        steps = [f"s = {s}"]
        for i in range(start, n):
            s = s * i if op == "*" else s + i * k
            steps.append(f"i = {i}: s = {s}")
        return s, steps + [f"return {s}"]

    return src, trace_fn, lambda: rng.randint(1, 1 + difficulty), False  # short traces at low difficulty


def _list_sum(rng: random.Random, difficulty: int):
    t = rng.randint(2, 6)
    src = f"def f(xs):\n    return sum(x for x in xs if x > {t})"

    def trace_fn(xs):
        kept = [x for x in xs if x > t]
        return sum(kept), [f"elements > {t}: {kept}", f"sum = {sum(kept)}"]

    return src, trace_fn, lambda: [rng.randint(0, 9) for _ in range(rng.randint(3, 2 + difficulty))], False


def _digits(rng: random.Random, difficulty: int):
    src = "def f(n):\n    s = 0\n    while n > 0:\n        s = s + n % 10\n        n = n // 10\n    return s"

    def trace_fn(n):
        digits = [int(c) for c in str(n)]
        return sum(digits), [f"digits of {n}: {' + '.join(map(str, digits))} = {sum(digits)}"]

    return src, trace_fn, lambda: rng.randint(10, 10 ** min(difficulty, 6)), False


# family -> (builder, lowest difficulty, weight)
FAMILIES = {
    "affine": (_affine, 1, 3.0),
    "parity": (_parity, 1, 2.0),
    "loop": (_loop, 2, 2.0),
    "list_sum": (_list_sum, 3, 1.0),
    "digits": (_digits, 4, 1.0),
}


def generate(rng: random.Random, difficulty: int, family: str | None = None) -> dict:
    """One code item. ``find_input`` only for families whose output pins down a simple integer input."""
    if family is None:
        names = [n for n, (_, lo, _) in FAMILIES.items() if lo <= difficulty]
        family = rng.choices(names, [FAMILIES[n][2] for n in names])[0]
    source, trace_fn, draw_input, invertible = FAMILIES[family][0](rng, difficulty)
    arg = draw_input()
    output = run_function(source, "f", arg)
    traced, steps = trace_fn(arg)
    if traced != output:  # the trace is the worked solution; it must match the real run
        raise AssertionError(f"generator {family}: trace {traced!r} != run {output!r} for {source!r}")
    kind = "find_input" if invertible and rng.random() < 0.4 else "predict_output"
    meta = {"family": family, "kind": kind, "source": source, "func": "f", "input": arg, "output": output}
    if kind == "predict_output":
        prompt = f"{source}\nWhat does f({arg!r}) return?"
        solution = "; ".join(steps) + "."
        answer = repr(output)
    else:
        prompt = f"{source}\nFind an integer x such that f(x) == {output!r}."
        solution = f"Try x = {arg!r}: " + "; ".join(steps) + "."
        answer = repr(arg)
    return {"prompt": prompt, "answer": answer, "solution": solution, "meta": meta}
