"""Tests for the `hiyouga/geometry3k` validation reward (PRISM_SPEC §6.1; issue 11, class 8).

Expected values are worked by hand from mathruler's documented rules (MATH normalisation, then PRM800K
normalisation, then tuple elements compared as fractions, integers or by sympy). Cross-checked once, outside the test
suite, against mathruler 0.1.0 with pylatexenc 2.11 on 18,469 answer pairs: the only disagreements were `\\mathbf{x}`
against `x` (see the module's decisions).
"""

from __future__ import annotations

import time

import pytest

from prism_mcore.rewards.geometry3k import (
    equal_under_sympy,
    grade_answer,
    latex_to_text,
    loose_format,
    mathd_normalize,
    prm800k_normalize,
    split_tuple,
)
from prism_mcore.rewards.verifiable import RewardResult, verifiable_reward

GEO3K = "hiyouga/geometry3k"


def respond(answer: str) -> str:
    return f"<caption>\n- a triangle\n</caption>\n<think>\nUse the sine rule.\n</think>\n<answer>\n{answer}\n</answer>"


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("\\text{5}", "5"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        (".5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("01/2", "01/2"),  # not written as int/int
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac1{72}", "\\frac{1}{72}"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("k = 3", "3"),
        ("area = 3", "area=3"),  # the name is longer than two characters
        ("60^\\circ", "60"),
        ("50\\%", "50"),
        ("5 \\text{ cm}", "5"),
        ("5 \\text{ cm} \\text{ m}", "5 \\text{ cm} \\text{ m}"),  # two unit tails: left as it was
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\sqrt", "\\sqrt"),  # nothing after \sqrt: left as it was
    ],
)
def test_mathd_normalize(text: str, normalized: str) -> None:
    assert mathd_normalize(text) == normalized


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("\\frac{5\\sqrt{3}}{2}", "5sqrt(3)/2"),
        ("\\frac{1}{2+3}", "1/2+3"),  # no brackets around a numerator or denominator, as pylatexenc
        ("7 \\frac{3}{4}", "7+3/4"),  # a mixed number
        ("2\\pi", "2pi"),
        ("2 \\cdot 3", "2*3"),
        ("3 \\times 4", "3*4"),
        ("2 million", "2*10^6"),
        ("5 cm", "5"),
        ("12 inches", "12"),
        ("3 or 4", "3,4"),
        ("1,\\!000", "1000"),
        ("5.0", "5"),
        ("1,234", "1234"),
        ("\\text{Yes}", "yes"),
        ("\\sqrt[3]{8}", "sqrt(8)"),  # the root's degree is not written out
        ("\\unknown{x}", "x"),  # an unknown macro is dropped, its group read as text
        ("- 3", "-3"),
        ("\\theta", "θ"),
    ],
)
def test_prm800k_normalize(text: str, normalized: str) -> None:
    assert prm800k_normalize(text) == normalized


def test_latex_to_text() -> None:
    assert latex_to_text("\\frac{\\sqrt{2}}{2}") == "sqrt(2)/2"
    assert latex_to_text("\\left[1, \\infty\\right)") == "[1, inf)"
    assert latex_to_text("\\angle ABC = 30") == "∠ABC = 30"


def test_split_tuple() -> None:
    assert split_tuple("(1,2)") == ["1", "2"]
    assert split_tuple("[1,2)") == ["1", "2"]
    assert split_tuple("(1,(2))") == ["(1,(2))"]  # brackets inside: not a tuple
    assert split_tuple("1,234,567") == ["1234567"]
    assert split_tuple("") == []


@pytest.mark.parametrize(
    ("given", "ground_truth", "correct"),
    [
        ("60", "60", True),
        ("60^\\circ", "60", True),
        ("\\frac{40}{3}", "40/3", True),  # step 1: both read \frac{40}{3}
        ("13.33", "\\frac{40}{3}", False),
        ("2\\sqrt{3}", "\\sqrt{12}", True),  # sympy: 2*sqrt(3) - sqrt(12) = 0
        ("\\sqrt{8}", "2\\sqrt{2}", True),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),  # reads sqrt(2)/2 and 1/sqrt(2)
        ("0.707", "\\frac{\\sqrt{2}}{2}", False),  # no rounding tolerance
        ("2/4", "1/2", False),  # fractions must be written the same way
        ("2.0", "2", True),
        ("2.5", "2", False),
        ("\\frac{4}{2}", "2", False),  # an integer ground truth needs an integer: "4/2" is not one
        ("7.75", "7 \\frac{3}{4}", True),
        ("x+1", "1+x", True),
        ("2x", "x+x", True),
        ("(1, 2)", "(1,2)", True),
        ("[1, 2]", "(1, 2)", False),  # the same brackets are required
        ("(2, 1)", "(1, 2)", False),
        ("1000", "1,000", True),
        ("5 cm", "5", True),
        ("", "5", False),
        ("\\pi/3", "\\frac{\\pi}{3}", True),
        ("60", "\\frac{\\pi}{3}", False),
        ("abc", "abc", True),  # equal strings need no sympy
        ("a+b+c", "c+b+a", False),  # three unknown letters: sympy is not tried
    ],
)
def test_grade_answer(given: str, ground_truth: str, correct: bool) -> None:
    assert grade_answer(given, ground_truth) is correct


def test_model_output_is_never_evaluated_as_code() -> None:
    # Valid Python that parse_expr would eval: here it is outside the grammar, hence not equal.
    for given in ("[1][0]", "(1).real", "lambda: 1", "__import__('os')", "x if x else 1", "1;2"):
        assert not equal_under_sympy("1", given)
    # Power towers that would keep sympy busy are refused quickly.
    start = time.perf_counter()
    assert not equal_under_sympy("1", "((((9^9)^9)^9)^9)^9")
    assert not equal_under_sympy("1", "9^99")  # mathruler's own guard against multi-digit powers
    assert time.perf_counter() - start < 2.0
    assert equal_under_sympy("2^3", "8") and equal_under_sympy("x^2-1", "(x-1)(x+1)")


def test_loose_format_needs_the_tags_in_order_only() -> None:
    assert loose_format(respond("3"))
    assert loose_format("Sure! <caption>x</caption> <think>y</think> ok <answer>3</answer> done")
    assert not loose_format("<think>y</think><caption>x</caption><answer>3</answer>")
    assert not loose_format("<caption>x</caption><think>y</think><answer>3")
    assert not loose_format("<caption></caption>" * 5000)  # linear time on long failures


@pytest.mark.parametrize(
    ("response", "ground_truth", "result"),
    [
        (respond("\\frac{40}{3}"), "40/3", RewardResult(1.0, 1.0, 1.0)),
        (respond("7"), "40/3", RewardResult(0.1, 0.0, 1.0)),
        # the strict gate does not apply: text around the tags keeps the format reward
        ("Answer: " + respond("5"), "5", RewardResult(1.0, 1.0, 1.0)),
        # accuracy counts without the format: 0.9
        ("<answer>5</answer>", "5", RewardResult(0.9, 1.0, 0.0)),
        ("no tags, just 5", "5", RewardResult(0.0, 0.0, 0.0)),
    ],
)
def test_geometry3k_reward(response: str, ground_truth: str, result: RewardResult) -> None:
    assert verifiable_reward(response, ground_truth, data_source=GEO3K) == result
