"""Procedural math-reasoning items with worked solutions and checkable final answers.

Families (and the lowest difficulty at which each appears): multi-step arithmetic (1), linear
equations (1), modular arithmetic (1), number theory -- gcd, primality, divisors, statements to
verify (2), fractions (2). Difficulty 1-2 keeps numbers at 1-3 digits so the tiny preset's ~1M
parameter model can partly learn them; 3-5 add operands, precedence and bigger numbers.

    python -c "import random; from r1zero.data.gen_math import generate; print(generate(random.Random(0), 2))"

Every generator is a pure function of ``(rng, difficulty)`` returning a dict with ``prompt``,
``answer``, ``solution`` (short, step by step) and ``meta`` (``{"family": ...}``).
"""

from __future__ import annotations

import math
import random
from fractions import Fraction


def _item(family: str, prompt: str, answer, solution: str, **meta) -> dict:
    return {"prompt": prompt, "answer": str(answer), "solution": solution, "meta": {"family": family, **meta}}


def _signed(b: int) -> str:
    """`` + 5`` / `` - 5``: a constant term written the way a person would."""
    return f" + {b}" if b >= 0 else f" - {-b}"


def _coef(a: int) -> str:
    return {1: "x", -1: "-x"}.get(a, f"{a}x")


def _digits(rng: random.Random, difficulty: int) -> int:
    """A number whose size grows with difficulty: 1-2 digits at 1, up to 3 at 2, 4 at 4+."""
    hi = {1: 50, 2: 200, 3: 999, 4: 9999}.get(difficulty, 99999)
    return rng.randint(2, hi)


def arithmetic(rng: random.Random, difficulty: int) -> dict:
    if difficulty <= 2:
        a, b = _digits(rng, difficulty), _digits(rng, difficulty)
        op = rng.choice("+-*") if difficulty == 2 else rng.choice("+-")
        if op == "*":
            a, b = rng.randint(2, 30), rng.randint(2, 9)
        if op == "-" and b > a:
            a, b = b, a
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return _item("arithmetic", f"What is {a} {op} {b}?", value, f"{a} {op} {b} = {value}.")
    # a op b * c (precedence), plus one more term per level above 3.
    hi = 10 ** min(difficulty - 1, 3)
    a, b, c = rng.randint(2, hi), rng.randint(2, hi), rng.randint(2, 12)
    op = rng.choice("+-")
    prod = b * c
    value = a + prod if op == "+" else a - prod
    expr = f"{a} {op} {b} * {c}"
    steps = [f"First {b} * {c} = {prod}.", f"Then {a} {op} {prod} = {value}."]
    for _ in range(difficulty - 3):
        t, op2 = rng.randint(2, 99), rng.choice("+-")
        new = value + t if op2 == "+" else value - t
        steps.append(f"Then {value} {op2} {t} = {new}.")
        expr += f" {op2} {t}"
        value = new
    return _item("arithmetic", f"Compute {expr}.", value, " ".join(steps))


def linear(rng: random.Random, difficulty: int) -> dict:
    x = rng.randint(1, 12) if difficulty <= 2 else rng.randint(-10 * difficulty, 10 * difficulty)
    if difficulty == 1:
        a = rng.randint(1, 30)
        b = x + a
        return _item("linear", f"Solve for x: x + {a} = {b}.", x, f"Subtract {a} from both sides: x = {b} - {a} = {x}.")
    if difficulty == 2:
        a, b = rng.randint(2, 9), rng.randint(1, 20)
        c = a * x + b
        return _item("linear", f"Solve for x: {a}x + {b} = {c}.", x,
                     f"Subtract {b}: {a}x = {c - b}. Divide by {a}: x = {x}.")
    a, c = rng.randint(2, 4 * difficulty), rng.randint(1, 4 * difficulty - 1)
    if a == c:
        a += 1
    b = rng.randint(-15 * difficulty, 15 * difficulty)
    d = (a - c) * x + b
    return _item("linear", f"Solve for x: {_coef(a)}{_signed(b)} = {_coef(c)}{_signed(d)}.", x,
                 f"Move terms: {_coef(a - c)} = {d}{_signed(-b)} = {d - b}. Divide by {a - c}: x = {x}.")


def modular(rng: random.Random, difficulty: int) -> dict:
    m = rng.randint(2, 9 if difficulty <= 2 else 30)
    if difficulty <= 2:
        a = rng.randint(m + 1, 60 if difficulty == 1 else 300)
        q, r = divmod(a, m)
        return _item("modular", f"What is {a} mod {m}?", r, f"{a} = {q} * {m} + {r}, so {a} mod {m} = {r}.")
    if difficulty == 3:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        r = (a * b) % m
        return _item("modular", f"What is ({a} * {b}) mod {m}?", r,
                     f"{a} mod {m} = {a % m}, {b} mod {m} = {b % m}. {a % m} * {b % m} = {(a % m) * (b % m)}, "
                     f"and that mod {m} is {r}.")
    base, k, m = rng.randint(2, 10 * difficulty), rng.randint(3, 6 + difficulty), rng.randint(3, 20 * difficulty)
    steps, acc = [], 1
    for i in range(1, k + 1):
        acc = (acc * base) % m
        steps.append(f"{base}^{i} mod {m} = {acc}")
    return _item("modular", f"What is {base}^{k} mod {m}?", acc, "; ".join(steps) + ".")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % p for p in range(2, math.isqrt(n) + 1))


def number_theory(rng: random.Random, difficulty: int) -> dict:
    kind = rng.choice(["gcd", "prime", "divisors", "verify"] if difficulty >= 3 else ["gcd", "prime"])
    if kind == "gcd":
        g = rng.randint(2, 4 * difficulty + 4)
        a, b = g * rng.randint(1, 9 + 3 * difficulty), g * rng.randint(1, 9 + 3 * difficulty)
        steps, x, y = [], max(a, b), min(a, b)
        while y:
            steps.append(f"{x} mod {y} = {x % y}")
            x, y = y, x % y
        return _item("number_theory", f"What is gcd({a}, {b})?", x, "; ".join(steps) + f". So gcd = {x}.", kind=kind)
    if kind == "prime":
        n = rng.randint(10, 10 ** min(difficulty, 6))
        if _is_prime(n):
            sol = f"No divisor of {n} up to {math.isqrt(n)}, so {n} is prime."
        else:
            p = next(p for p in range(2, n) if n % p == 0)
            sol = f"{n} = {p} * {n // p}, so it is not prime."
        return _item("number_theory", f"Is {n} prime? Answer yes or no.", "yes" if _is_prime(n) else "no", sol, kind=kind)
    if kind == "divisors":
        n = rng.randint(6, 60 * difficulty)
        divs = [d for d in range(1, n + 1) if n % d == 0]
        return _item("number_theory", f"How many positive divisors does {n} have?", len(divs),
                     f"The divisors are {', '.join(map(str, divs))}: {len(divs)} of them.", kind=kind)
    # A statement to verify: the sum of the first n odd numbers equals n^2 (true), or a perturbed claim.
    n = rng.randint(3, 5 + 2 * difficulty)
    claim = n * n + (0 if rng.random() < 0.5 else rng.choice([-2, -1, 1, 2]))
    total = n * n
    return _item("number_theory", f"True or false: 1 + 3 + ... + {2 * n - 1} = {claim}.", "true" if claim == total else "false",
                 f"The sum of the first {n} odd numbers is {n}^2 = {total}, which {'equals' if claim == total else 'is not'} {claim}.",
                 kind="verify")


def fractions(rng: random.Random, difficulty: int) -> dict:
    hi = 9 if difficulty <= 3 else 5 * difficulty
    p, q = Fraction(rng.randint(1, hi), rng.randint(2, hi)), Fraction(rng.randint(1, hi), rng.randint(2, hi))
    op = rng.choice("+-") if difficulty <= 3 else rng.choice("+-*/")
    if op == "-" and q > p:
        p, q = q, p
    value = {"+": p + q, "-": p - q, "*": p * q, "/": p / q}[op]
    ans = f"{value.numerator}/{value.denominator}" if value.denominator != 1 else str(value.numerator)
    fmt = (lambda f: f"({f})") if op in "*/" else str
    prompt = f"Compute {fmt(p)} {op} {fmt(q)}. Give a reduced fraction."
    if op in "+-":
        den = p.denominator * q.denominator // math.gcd(p.denominator, q.denominator)
        a, b = p.numerator * den // p.denominator, q.numerator * den // q.denominator
        num = a + b if op == "+" else a - b
        tail = "" if (num, den) == (value.numerator, value.denominator) else f" = {ans}"
        sol = f"Common denominator {den}: {a}/{den} {op} {b}/{den} = {num}/{den}{tail}."
    else:
        sol = f"{fmt(p)} {op} {fmt(q)} = {ans}."
    return _item("fractions", prompt, ans, sol)


# family -> (generator, lowest difficulty, weight)
FAMILIES = {
    "arithmetic": (arithmetic, 1, 3.0),
    "linear": (linear, 1, 2.0),
    "modular": (modular, 1, 1.0),
    "number_theory": (number_theory, 2, 1.0),
    "fractions": (fractions, 2, 1.0),
}


def generate(rng: random.Random, difficulty: int, family: str | None = None) -> dict:
    """One item at ``difficulty``; ``family`` picks the family (default: weighted among eligible)."""
    if family is None:
        names = [n for n, (_, lo, _) in FAMILIES.items() if lo <= difficulty]
        family = rng.choices(names, [FAMILIES[n][2] for n in names])[0]
    return FAMILIES[family][0](rng, difficulty)
