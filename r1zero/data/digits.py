"""Digit-by-digit ("column") working for the arithmetic inside worked solutions.

A tiny model cannot add 147 + 88 in one shot: the first digit it must write depends on carries
from every digit after it. Written out column by column from the right, each step is a one-digit
fact plus a carry, and the answer is built as a growing suffix that the model only has to copy::

    147 + 88 = 235   ->   147 + 88 = (7+8=15>5,4+8+1=13>35,1+0+1=2>235) 235

``data.solution_style: digits`` renders every worked solution this way
(:func:`expand_arithmetic`); ``plain`` (the default) leaves it as generated. Only single
operations whose stated result is right are expanded: ``A + B``, ``A - B`` (result >= 0) and
``A * B`` with one one-digit factor, both operands non-negative and one of them >= 10 (one-digit
facts stay as they are); ``A * B +/- C = R`` (the code family's affine bodies) becomes
``A * B = (...) P, P +/- C = (...) R``. Anything else (division, negative numbers, longer chains)
is left unchanged.

    python -c "from r1zero.data.digits import expand_arithmetic as e; print(e('x = 147 + 88 = 235.'))"

Column format (right to left, ``,`` between columns, ``>`` then the answer suffix so far):
``a+b[+1]=s`` (``+1``: carry in), ``a-b[-1]=d`` with ``1a-b...`` when it borrows, ``a*k[+c]=p``;
once the shorter operand is used up with no carry or borrow, the rest of the longer one is copied
as one last "column" (``147 + 8 = (7+8=15>5,4+0+1=5>55,1>155) 155``); the last column prepends its
whole result, and the final suffix drops leading zeros.
"""

from __future__ import annotations

import re

# one operation "A op B = R" not preceded/followed by more arithmetic on either side
_OP = re.compile(r"(?<![\d*+/-] )(?<![\d.])(\d+) ([+*-]) (\d+) = (-?\d+)(?!\.?\d)(?! [*+/-] )")
# the code family's affine body: "A * B +/- C = R"
_AFFINE = re.compile(r"(?<![\d.])(\d+) \* (\d+) ([+-]) (\d+) = (-?\d+)(?!\.?\d)")


def _digits(n: int) -> list[int]:
    """Least-significant first."""
    return [int(c) for c in reversed(str(n))]


def _columns(steps: list[tuple[str, int]]) -> str:
    """``steps``: (column text, column result) right to left -> ``(...)``; a column adds its
    result's last digit to the suffix, the last column its whole result."""
    parts, suffix = [], ""
    for i, (text, value) in enumerate(steps):
        last = i == len(steps) - 1
        suffix = (str(value) if last else str(value % 10)) + suffix
        if last:
            suffix = suffix.lstrip("0") or "0"
        parts.append(f"{text}>{suffix}")
    return "(" + ",".join(parts) + ")"


def add_columns(a: int, b: int) -> str:
    da, db = _digits(a), _digits(b)
    nb, n = len(db), max(len(da), len(db))
    da, db = da + [0] * (n - len(da)), db + [0] * (n - nb)
    steps, carry = [], 0
    for i in range(n):
        if i >= nb and not carry:  # the rest of a is copied: "1>155"
            steps.append((str(a // 10 ** i), a // 10 ** i))
            break
        s = da[i] + db[i] + carry
        steps.append((f"{da[i]}+{db[i]}" + ("+1" if carry else "") + f"={s}", s))
        carry = s // 10
    return _columns(steps)


def sub_columns(a: int, b: int) -> str:
    """``a - b`` for a >= b >= 0."""
    da, db = _digits(a), _digits(b)
    nb = len(db)
    db = db + [0] * (len(da) - nb)
    steps, borrow = [], 0
    for i in range(len(da)):
        if i >= nb and not borrow:  # the rest of a is copied
            steps.append((str(a // 10 ** i), a // 10 ** i))
            break
        top = da[i]
        d = top - db[i] - borrow
        lend = d < 0
        if lend:
            top, d = top + 10, d + 10
        text = f"{top}-{db[i]}" + ("-1" if borrow else "") + f"={d}"
        steps.append((text, d))
        borrow = 1 if lend else 0
    return _columns(steps)


def mul_columns(a: int, k: int) -> str:
    """``a * k`` for a one-digit ``k``."""
    steps, carry = [], 0
    for x in _digits(a):
        p = x * k + carry
        steps.append((f"{x}*{k}" + (f"+{carry}" if carry else "") + f"={p}", p))
        carry = p // 10
    return _columns(steps)


def columns(a: int, op: str, b: int) -> str | None:
    """The column working for ``a op b`` (non-negative ints), or None when it is not expanded."""
    if max(a, b) < 10:
        return None
    if op == "+":
        return add_columns(a, b)
    if op == "-":
        return sub_columns(a, b) if a >= b else None
    if op == "*":
        if b < 10:
            return mul_columns(a, b)
        if a < 10:
            return mul_columns(b, a)
    return None


def _value(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _one(a: int, op: str, b: int, r: int, text: str) -> str:
    cols = columns(a, op, b) if _value(a, op, b) == r else None
    return text if cols is None else f"{a} {op} {b} = {cols} {r}"


def expand_arithmetic(solution: str) -> str:
    """``solution`` with each expandable operation written out in columns (see module docstring)."""
    def affine(m: re.Match) -> str:
        a, b, op, c, r = int(m[1]), int(m[2]), m[3], int(m[4]), int(m[5])
        p = a * b
        if _value(p, op, c) != r:
            return m[0]
        return f"{_one(a, '*', b, p, f'{a} * {b} = {p}')}, {_one(p, op, c, r, f'{p} {op} {c} = {r}')}"

    out = _AFFINE.sub(affine, solution)
    return _OP.sub(lambda m: _one(int(m[1]), m[2], int(m[3]), int(m[4]), m[0]), out)
