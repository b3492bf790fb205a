"""Tests for r1zero.data.digits: column working for the arithmetic in worked solutions."""

from __future__ import annotations

import pytest

from r1zero.data.digits import columns, expand_arithmetic


@pytest.mark.parametrize(("a", "op", "b", "want"), [
    (147, "+", 88, "(7+8=15>5,4+8+1=13>35,1+0+1=2>235)"),
    (147, "+", 8, "(7+8=15>5,4+0+1=5>55,1>155)"),  # rest of 147 copied once the carry is spent
    (999, "+", 1, "(9+1=10>0,9+0+1=10>00,9+0+1=10>1000)"),
    (105, "-", 98, "(15-8=7>7,10-9-1=0>07,1-0-1=0>7)"),  # borrows; leading zeros dropped at the end
    (160, "-", 55, "(10-5=5>5,6-5-1=0>05,1>105)"),
    (147, "*", 8, "(7*8=56>6,4*8+5=37>76,1*8+3=11>1176)"),
    (9, "*", 23, "(3*9=27>7,2*9+2=20>207)"),  # the one-digit factor goes second
])
def test_columns_by_hand(a, op, b, want):
    assert columns(a, op, b) == want


@pytest.mark.parametrize(("a", "op", "b"), [(7, "+", 8), (3, "-", 5), (12, "-", 30), (12, "*", 34), (4, "/", 2)])
def test_not_expanded(a, op, b):
    """One-digit facts, negative differences, two multi-digit factors, other operators."""
    assert columns(a, op, b) is None


def test_last_suffix_is_the_result_for_every_expanded_operation():
    n = 0
    for a in range(0, 1200, 7):
        for b in range(0, 400, 3):
            for op, value in (("+", a + b), ("-", a - b), ("*", a * b)):
                cols = columns(a, op, b)
                if cols is not None:
                    n += 1
                    assert cols[0] == "(" and cols[-1] == ")"
                    assert cols[1:-1].split(",")[-1].split(">")[-1] == str(value), (a, op, b, cols)
    assert n > 20_000


def test_expand_arithmetic_in_solutions():
    assert expand_arithmetic("Subtract 12 from both sides: x = 15 - 12 = 3.") == \
        "Subtract 12 from both sides: x = 15 - 12 = (5-2=3>3,1-1=0>3) 3."
    assert expand_arithmetic("17 * 9 = 153.") == "17 * 9 = (7*9=63>3,1*9+6=15>153) 153."
    # the code family's affine body: the product first, then the sum
    assert expand_arithmetic("so return 16 * 3 - 9 = 39.") == \
        "so return 16 * 3 = (6*3=18>8,1*3+1=4>48) 48, 48 - 9 = (18-9=9>9,4-0-1=3>39) 39."
    assert expand_arithmetic("return 7 * 2 - 2 = 12.") == "return 7 * 2 = 14, 14 - 2 = (4-2=2>2,1>12) 12."


@pytest.mark.parametrize("text", [
    "12 + 30 = 43.",  # a wrong stated result is never "worked"
    "y = 1 - 2 = -1; return -1 - 9 = -10.",  # negative numbers
    "43000 / 1000 = 43 km.",  # division
    "10 = 3 * 3 + 1, so 10 mod 3 = 1.",  # not of the form A op B = R
    "1.5 + 20 = 21.5",  # decimals
    "3 + 4 = 7.",  # one-digit fact
])
def test_expand_arithmetic_leaves_other_text_alone(text):
    assert expand_arithmetic(text) == text
