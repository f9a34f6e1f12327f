"""Tests for the accuracy judges and time-limited math-verify (PRISM_SPEC §6.2, §6.3).

Each step of the `mm_gad` rule judge is checked on hand-worked inputs; the full examples table is in
test_rewards_verifiable.py. The math-verify tests run it on the main thread, from worker threads (through helper
processes), and past its time limit.
"""

from __future__ import annotations

import operator
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from prism_mcore.rewards import math_verify_runner
from prism_mcore.rewards.math_verify_judge import math_verify_accuracy
from prism_mcore.rewards.math_verify_runner import math_equivalent
from prism_mcore.rewards.mm_gad_judge import (
    coordinates,
    mcq_letter,
    mm_gad_accuracy,
    normalize_latex,
    parse_mcq,
    relaxed_match,
    simple_parse,
    single_value_match,
    split_multi_value,
    split_unit,
)

# --- mm_gad, step 1: multi-value split ---


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("(1) 3 (2) 4", ["3", "4"]),
        ("a (1) x (2) y", ["x", "y"]),  # first marker at index 2
        ("ab (1) x (2) y", ["ab (1) x (2) y"]),  # first marker at index 3: not numbered
        ("(1) only one", ["(1) only one"]),
        ("3; 4；5", ["3", "4", "5"]),
        ("3;", ["3;"]),  # one non-empty part: no split by semicolons, none by commas
        ("f(1, 2), [3, 4], {5, 6}", ["f(1, 2)", "[3, 4]", "{5, 6}"]),
        ("1,000", ["1", "000"]),
        ("(2, 3)", ["(2, 3)"]),
        ("x = 2", ["x = 2"]),
    ],
)
def test_split_multi_value(text: str, parts: list[str]) -> None:
    assert split_multi_value(text) == parts


# --- mm_gad, step 2: simple parse ---


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        (" $\\dfrac{ 1 }{2}$ ", "\\frac{1}{2}"),
        ("$$x$$", "x"),
        ("\\(\\left( 1,234.5 \\right)\\)", "( 1234.5 )"),
        ("\\[\\tfrac{3}{4}\\]", "\\frac{3}{4}"),
        ("12\\ \\text{\\mathrm{cm}}", "12\\ cm"),
        ("\\rightarrow", "\\rightarrow"),  # \right only as a whole command
        ("3，5 and 1,2", "35 and 12"),
        ("Yes.", "Yes"),
        ("3..", "3."),  # one trailing period only
        ("(2,3)", "(23)"),
    ],
)
def test_simple_parse(text: str, parsed: str) -> None:
    assert simple_parse(text) == parsed


def test_normalize_latex_collapses_whitespace() -> None:
    assert normalize_latex("a \n\t b  { c }") == "a b {c}"


def test_coordinates() -> None:
    assert coordinates("(1, -2.5) and ( +3 ,4e1 )") == [(1.0, -2.5), (3.0, 40.0)]
    assert coordinates("(23)") == []


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "correct"),
    [
        ("(1.0000001, 2)", "(1, 2)", True),  # within 1e-6
        ("(1.00001, 2)", "(1, 2)", False),
        ("(2, 1)", "(1, 2)", False),
        ("(1, 2) and (3, 4)", "(1, 2)", False),  # lengths differ, and the coordinate result is final
    ],
)
def test_coordinate_comparison(prediction: str, ground_truth: str, correct: bool) -> None:
    assert single_value_match(prediction, ground_truth, use_math_verify=True) is correct


# --- mm_gad, step 2.2: relaxed match ---


@pytest.mark.parametrize(
    ("ground_truth", "letter"),
    [("B", "B"), ("(B) 45°", "B"), ("B. 45°", "B"), ("C. -3", "C"), ("D. (x, y)", "D"), ("A. twelve", None)]
    + [("b", None), ("(B)", None), ("B. 4", None), ("I", None)],
)
def test_mcq_letter(ground_truth: str, letter: str | None) -> None:
    assert mcq_letter(ground_truth) == letter


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("(b)", "B"),
        (" [C]. ", "C"),
        ("d:", "D"),
        ("The answer is (C)", "C"),
        ("Option: d", "D"),
        ("(A) or (C)", "A"),  # same priority: earliest
        ("B) then (C)", "C"),  # "(L)" (8) beats "L)" (6) although B comes first
        ("I pick (A). The answer is C", "C"),  # "answer is L" (10) beats everything
        ("A. and B.", "A"),
        ("no option named", None),
    ],
)
def test_parse_mcq(prediction: str, letter: str | None) -> None:
    assert parse_mcq(prediction) == letter


@pytest.mark.parametrize(
    ("text", "stem", "unit"),
    [("12 cm", "12", "cm"), ("45°", "45", "°"), ("5m/s", "5", "m/s"), ("x cm", "x", "cm"), ("100元", "100", "元")]
    + [("yes", "yes", None), ("cm", "cm", None)],
)
def test_split_unit(text: str, stem: str, unit: str | None) -> None:
    assert split_unit(text) == (stem, unit)


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "correct"),
    [
        ("0.0", "0", True),
        ("1e-9", "0", False),  # a zero ground truth needs an exact zero
        ("1000000.5", "1000000", True),  # relative error 5e-7
        ("1000002", "1000000", False),  # relative error 2e-6
        ("-3", "3", False),  # numbers are decided numerically, never by the punctuation-stripped step
        ("45°", "45", True),
        ("X  CM", "x cm", True),  # lower case, whitespace collapsed
        ("x cm", "x", False),  # units differ
        ("「是」", "是", True),  # CJK punctuation stripped
    ],
)
def test_relaxed_match(prediction: str, ground_truth: str, correct: bool) -> None:
    assert relaxed_match(prediction, ground_truth) is correct


def test_multi_value_parts_skip_math_verify() -> None:
    # "0.5" equals "\frac{1}{2}" only through math-verify, which multi-value parts do not use.
    assert mm_gad_accuracy("0.5", "\\frac{1}{2}") == 1.0
    assert mm_gad_accuracy("0.5; 2", "\\frac{1}{2}; 2") == 0.0
    assert mm_gad_accuracy("1/2; 2", "1/2; 2") == 1.0


# --- math_verify_with_format ---


@pytest.mark.parametrize(
    ("equivalent_answers", "accuracy"),
    [(None, 0.0), (["\\frac{1}{2}"], 1.0), (["7", "0.5"], 1.0), (["__EMPTY__", "\\frac{1}{2}"], 0.0)],
)
def test_math_verify_uses_equivalent_answers(equivalent_answers: list[str] | None, accuracy: float) -> None:
    assert math_verify_accuracy("0.5", "\\frac{1}{3}", equivalent_answers) == accuracy


# --- time-limited, thread-safe math-verify ---

HARD_GOLD, HARD_PREDICTION = "$(x+1)^{3000}$", "$(x+2)^{3000}$"  # sympy needs far more than 1 s to compare them


def test_math_equivalent_on_the_main_thread() -> None:
    assert math_equivalent(["\\frac{1}{2}"], ["0.5"])
    assert not math_equivalent(["\\sqrt{8}"], ["2\\sqrt{2}"])  # bare \sqrt does not parse


def test_math_equivalent_times_out_on_the_main_thread() -> None:
    start = time.perf_counter()
    assert not math_equivalent([HARD_GOLD], [HARD_PREDICTION], timeout_s=1)
    assert time.perf_counter() - start < 4.0  # one comparison times out; the others are instant


def test_math_equivalent_from_worker_threads() -> None:
    # math-verify's own alarms raise ValueError off the main thread; helper processes run the work instead.
    with ThreadPoolExecutor(max_workers=2) as pool:
        equal = pool.submit(math_equivalent, ["\\frac{1}{2}"], ["0.5"])
        unequal = pool.submit(math_equivalent, ["\\frac{1}{2}"], ["0.6"])
        assert equal.result() and not unequal.result()
        start = time.perf_counter()
        assert not pool.submit(math_equivalent, [HARD_GOLD], [HARD_PREDICTION], timeout_s=1).result()
        assert time.perf_counter() - start < 4.0  # the helper's alarm fired; the helper was not killed


def test_a_stuck_helper_is_killed_and_replaced() -> None:
    with pytest.raises(TimeoutError):
        math_verify_runner._call_in_helper(time.sleep, (60,), 0.5)
    assert math_verify_runner._call_in_helper(operator.add, (2, 3), 60.0) == 5
