"""Procedural cross-domain transfer items: unit conversion, sequences, logic puzzles, word problems.

Each family mixes a reasoning skill with a second domain (physical units, pattern induction,
ordering logic, arithmetic inside a story or a loop), so GRPO gains on math/code can be probed for
transfer. Answers are a number or a single word, checked by normalised/numeric comparison.

    python -c "import random; from r1zero.data.gen_cross import generate; print(generate(random.Random(0), 2))"
"""

from __future__ import annotations

import random

# (from unit, to unit, factor): exact SI / clock factors.
_UNITS = [
    ("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000), ("L", "mL", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
]
_NAMES = ["Ann", "Bob", "Cy", "Dee", "Eve", "Finn", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu", "Max", "Ned", "Oli", "Pat"]
_TRAITS = [("taller", "tallest", "shortest"), ("older", "oldest", "youngest"), ("faster", "fastest", "slowest"),
           ("heavier", "heaviest", "lightest")]
_ITEMS = ["apples", "pens", "books", "coins", "cards", "shells", "stamps", "marbles"]


def _item(family: str, prompt: str, answer, solution: str) -> dict:
    return {"prompt": prompt, "answer": str(answer), "solution": solution, "meta": {"family": family}}


def units(rng: random.Random, difficulty: int) -> dict:
    big, small, k = rng.choice(_UNITS)
    n = rng.randint(2, 9 if difficulty == 1 else 10 ** difficulty // 2)
    if difficulty >= 2 and rng.random() < 0.5:  # small -> big, chosen to come out whole
        return _item("units", f"Convert {n * k} {small} to {big}.", n, f"1 {big} = {k} {small}, so {n * k} / {k} = {n} {big}.")
    return _item("units", f"Convert {n} {big} to {small}.", n * k, f"1 {big} = {k} {small}, so {n} * {k} = {n * k} {small}.")


def sequence(rng: random.Random, difficulty: int) -> dict:
    length = 4 if difficulty <= 2 else 5
    kind = rng.choice(["arith"] if difficulty == 1 else ["arith", "geom"] if difficulty == 2 else ["arith", "geom", "square", "fib"])
    if kind == "arith":
        a, d = rng.randint(1, 20 * difficulty), rng.randint(2, 5 * difficulty) * rng.choice([1, -1] if difficulty > 2 else [1])
        seq = [a + i * d for i in range(length + 1)]
        why = f"Each term adds {d}: {seq[-2]} + {d} = {seq[-1]}."
    elif kind == "geom":
        a, r = rng.randint(1, 5 * difficulty), rng.randint(2, 1 + difficulty)
        seq = [a * r**i for i in range(length + 1)]
        why = f"Each term is multiplied by {r}: {seq[-2]} * {r} = {seq[-1]}."
    elif kind == "square":
        a = rng.randint(1, 6 * difficulty)
        seq = [(a + i) ** 2 for i in range(length + 1)]
        why = f"These are squares: {a + length}^2 = {seq[-1]}."
    else:
        x, y = rng.randint(1, 5 * difficulty), rng.randint(1, 5 * difficulty)
        seq = [x, y]
        while len(seq) < length + 1:
            seq.append(seq[-1] + seq[-2])
        why = f"Each term is the sum of the two before: {seq[-3]} + {seq[-2]} = {seq[-1]}."
    return _item("sequence", f"What comes next: {', '.join(map(str, seq[:-1]))}, ?", seq[-1], why)


def logic(rng: random.Random, difficulty: int) -> dict:
    n = 3 if difficulty <= 2 else min(3 + difficulty - 2, 6)
    names = rng.sample(_NAMES, n)  # names[0] has the most of the trait
    comp, most, least = rng.choice(_TRAITS)
    pairs = [(names[i], names[i + 1]) for i in range(n - 1)]
    rng.shuffle(pairs)
    facts = " ".join(f"{a} is {comp} than {b}." for a, b in pairs)
    ask_most = rng.random() < 0.5
    target = names[0] if ask_most else names[-1]
    chain = " > ".join(names)
    return _item("logic", f"{facts} Who is the {most if ask_most else least}?", target,
                 f"Order by {comp}: {chain}. So the {most if ask_most else least} is {target}.")


def word_problem(rng: random.Random, difficulty: int) -> dict:
    kind = rng.choice(["groups", "loop", "speed"] if difficulty >= 2 else ["groups", "loop"])
    if kind == "groups":
        name, thing = rng.choice(_NAMES), rng.choice(_ITEMS)
        g, per = rng.randint(2, 5 + difficulty), rng.randint(2, 5 + difficulty)
        give = rng.randint(1, g * per - 1)
        left = g * per - give
        return _item("word_problem", f"{name} has {g} boxes of {per} {thing} and gives away {give}. How many {thing} are left?",
                     left, f"{g} * {per} = {g * per} {thing}. {g * per} - {give} = {left}.")
    if kind == "loop":
        start, step, times = rng.randint(0, 9), rng.randint(2, 5 + difficulty), rng.randint(2, 3 + difficulty)
        end = start + step * times
        return _item("word_problem", f"A counter starts at {start}. A loop adds {step} to it {times} times. What is the counter?",
                     end, f"It adds {step} * {times} = {step * times}. {start} + {step * times} = {end}.")
    speed, hours = rng.choice([20, 30, 40, 50, 60, 80]), rng.randint(2, 3 + difficulty)
    dist = speed * hours
    return _item("word_problem", f"A train goes {speed} km per hour for {hours} hours. How many km does it travel?",
                 dist, f"{speed} * {hours} = {dist} km.")


FAMILIES = {
    "units": (units, 1, 1.0),
    "sequence": (sequence, 1, 1.0),
    "logic": (logic, 1, 1.0),
    "word_problem": (word_problem, 1, 1.0),
}


def generate(rng: random.Random, difficulty: int, family: str | None = None) -> dict:
    """One item at ``difficulty``; ``family`` picks the family (default: weighted among eligible)."""
    if family is None:
        names = [n for n, (_, lo, _) in FAMILIES.items() if lo <= difficulty]
        family = rng.choices(names, [FAMILIES[n][2] for n in names])[0]
    return FAMILIES[family][0](rng, difficulty)
