"""Tests for the accuracy judges and time-limited math-verify (PRISM_SPEC §6.2, §6.3).

Each step of the `mm_gad` rule judge is checked on hand-worked inputs, and each class of disagreement with the
reference found by issue 11 has a test with examples of its own (the full examples table is in
test_rewards_verifiable.py, the property-based fuzz in test_rewards_fuzz.py). The math-verify tests run it on the
main thread, from worker threads (through helper processes), and past its time limit.
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
    loose_text,
    mcq_letter,
    mm_gad_accuracy,
    normalize_latex,
    parse_mcq,
    parse_number,
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
        ("(1) 3, (2) 4;", ["3", "4"]),  # separators after a numbered item are dropped
        ("(1) 3; 4 (2)", ["(1) 3", "4 (2)"]),  # one non-empty numbered item: semicolons decide
        ("3; 4；5", ["3", "4", "5"]),
        ("3;", ["3;"]),  # one non-empty part: no split by semicolons, none by commas
        ("f(1, 2), [3, 4], {5, 6}", ["f(1, 2)", "[3, 4]", "{5, 6}"]),
        ("1,000", ["1", "000"]),
        ("(2, 3)", ["(2, 3)"]),
        ("x = 2", ["x = 2"]),
        # lettered sub-answers (Decision 5): a, b, c… in order, either case, not options listed out of order
        ("(a) 4 (b) 3", ["4", "3"]),
        ("(A) x=1 (B) y=2 (C) z", ["x=1", "y=2", "z"]),
        ("(a) 4 (c) 3", ["(a) 4 (c) 3"]),
        ("(A) or (C)", ["(A) or (C)"]),
        ("(A) or (B)", ["(A) or (B)"]),  # one non-empty item
        ("(a) 4 (B) 3", ["(a) 4 (B) 3"]),
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
        ("$\\(x\\)$", "x"),  # each kind of delimiter once, in order
        ("$$", "$$"),  # a delimiter pair around nothing stays
        ("\\(\\left( 1,234.5 \\right)\\)", "( 1234.5 )"),
        ("\\[\\tfrac{3}{4}\\]", "\\frac{3}{4}"),
        ("12\\ \\text{\\mathrm{cm}}", "12\\ cm"),
        ("\\text {5 cm}", "5 cm"),  # a space before the brace (class 4)
        ("\\mathrm  {kg}", "kg"),
        ("\\text{x^{2}}", "x^{2}"),  # the content ends at the first closing brace
        ("\\rightarrow", "\\rightarrow"),  # \right only as a whole command (Decision 2)
        ("\\left\\{ x \\right\\}", "\\{x \\}"),
        ("3，5 and 1,2", "35 and 12"),
        ("1,2,3", "12,3"),  # digit commas removed without overlap, as the reference
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
    assert coordinates("(.5, 2)") == [(0.5, 2.0)]  # Decision 1: the reference reads (5, 2)
    assert coordinates("[1, 2]") == [(1.0, 2.0)]  # the parentheses are optional
    assert coordinates("(23)") == []


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "correct"),
    [
        ("(1.0000001, 2)", "(1, 2)", True),  # within 1e-6
        ("(1.00001, 2)", "(1, 2)", False),
        ("(2, 1)", "(1, 2)", False),
        ("(1, 2) and (3, 4)", "(1, 2)", False),  # lengths differ, and the coordinate result is final
        ("[1, 2]", "(1, 2)", True),
        ("(.25, -4)", "(0.25, -4)", True),
    ],
)
def test_coordinate_comparison(prediction: str, ground_truth: str, correct: bool) -> None:
    assert single_value_match(prediction, ground_truth) is correct


# --- mm_gad, step 2.2: relaxed match ---


@pytest.mark.parametrize(
    ("ground_truth", "letter"),
    [("B", "B"), ("(B) 45°", "B"), ("B. 45°", "B"), ("C. -3", "C"), ("D. (x, y)", "D"), ("A. twelve", None)]
    + [("b", None), ("(B)", None), ("I", None), ("AB", None)]
    # class 3: one character after the space is enough
    + [("C. 3", "C"), ("B. 4", "B"), ("H. +", "H"), ("E. (", "E"), ("B.  x", None)]
    # class 6: lower-case labels in "(l) …" and "l. …" are options
    + [("(a) 5", "A"), ("(h) x + 1", "H"), ("c. 12", "C"), ("(i) 5", None)],
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
        ("the correct answer is b.", "B"),
        ("(A) or (C)", "A"),  # same priority: earliest
        ("B) then (C)", "C"),  # "(L)" (8) beats "L)" (6) although B comes first
        ("I pick (A). The answer is C", "C"),  # "answer is L" (10) beats everything
        ("A. and B.", "A"),
        ("so (a) it is", "A"),  # class 6: lower-case labels
        ("pick b) here", "B"),
        ("no option named", None),
        # class 7: a letter glued to other text is no label
        ("f(A)", None),
        ("B.5", None),
        ("x(B) or yC.", None),
        ("(A)(B)", None),
        ("answer is Cat", None),
        ("answer is C-1", None),
        ("f(A) but (D)", "D"),
    ],
)
def test_parse_mcq(prediction: str, letter: str | None) -> None:
    assert parse_mcq(prediction) == letter


@pytest.mark.parametrize(
    ("text", "stem", "unit"),
    [("12 cm", "12", "cm"), ("45°", "45", "°"), ("100元", "100", "元"), ("3 m²", "3", "m²")]
    # class 5: the reference's list, any case, only right after a digit
    + [("5Kg", "5", "kg"), ("7 Students", "7", "students"), ("2 ML", "2", "ml"), ("9 persons", "9", "persons")]
    + [("5m/s", "5m/s", None), ("5 m", "5 m", None), ("x cm", "x cm", None), ("yes", "yes", None)]
    + [("4 g", "4 g", None), ("3 dollars", "3 dollars", None), ("cm", "cm", None)],
)
def test_split_unit(text: str, stem: str, unit: str | None) -> None:
    assert split_unit(text) == (stem, unit)


@pytest.mark.parametrize(
    ("text", "number"),
    [("3", 3.0), ("-2.5e1 cm", -25.0), ("1,000", 1000.0), (".5", 0.5), ("1_000", 1000.0), ("12 Kg", 12.0)]
    + [("nan", None), ("-inf", None), ("Infinity", None), ("1/2", None), ("x", None)],
)
def test_parse_number(text: str, number: float | None) -> None:
    assert parse_number(text) == number


@pytest.mark.parametrize(
    ("text", "loose"),
    [
        ("**Yes**", "yes"),
        ("「是」", "「是」"),  # only the listed punctuation is deleted
        ("(x, y)!", "x y"),
        ("x + 1", "x + 1"),  # class 1: operators survive
        ("1/2", "1/2"),
        ("-\\frac{1}{2}", "-\\frac12"),
        ("x<3 = 50%", "x<3 = 50%"),
        ("x=1.5.", "x=1.5"),  # Decision 3: a decimal point stays, a final period does not
    ],
)
def test_loose_text(text: str, loose: str) -> None:
    assert loose_text(text) == loose


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
        ("x cm", "x", False),
        ("3/4 cm", "3/4cm", True),  # (v): same stem, same unit
        ("3/4 cm", "3/4 kg", False),
        ("NaN", "nan", True),  # Decision 4: not numbers, so step (iv) decides
        ("x=1.5", "x=15", False),  # Decision 3
    ],
)
def test_relaxed_match(prediction: str, ground_truth: str, correct: bool) -> None:
    assert relaxed_match(prediction, ground_truth) is correct


# --- mm_gad: one test per class of disagreement with the reference (issue 11), with examples of our own ---


@pytest.mark.parametrize(
    ("prediction", "ground_truth"),
    [
        ("12", "1/2"),
        ("-\\frac{1}{2}", "\\frac{1}{2}"),
        ("x<3", "x>3"),
        ("x+1", "x-1"),
        ("a/b", "ab"),
        ("2^3", "23"),
        ("y = -x", "y = x"),
        ("x \\geq 2", "x \\leq 2"),  # math-verify reads 2 out of both, but not whole (Decision 6)
    ],
)
def test_class1_operators_survive_the_loose_comparison(prediction: str, ground_truth: str) -> None:
    assert mm_gad_accuracy(prediction, ground_truth) == 0.0
    assert mm_gad_accuracy(ground_truth, ground_truth) == 1.0


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "accuracy"),
    [
        ("0.5; 3", "\\frac{1}{2}; 3", 1.0),
        ("(1) 0.25 (2) 2", "\\frac{1}{4}, 2", 1.0),
        ("50%, 1", "0.5, 1", 1.0),
        ("0.5; 4", "\\frac{1}{2}; 3", 0.0),
        ("\\frac{1}{3}; 3", "0.5; 3", 0.0),
    ],
)
def test_class2_every_part_gets_the_math_verify_fallback(prediction: str, ground_truth: str, accuracy: float) -> None:
    assert mm_gad_accuracy(prediction, ground_truth) == accuracy


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "accuracy"),
    [("C", "C. 3", 1.0), ("(D)", "D. 7", 1.0), ("B", "C. 3", 0.0), ("(C)", "D. 3", 0.0), ("A", "A. x", 0.0)],
)
def test_class3_one_character_after_a_dotted_label(prediction: str, ground_truth: str, accuracy: float) -> None:
    assert mm_gad_accuracy(prediction, ground_truth) == accuracy


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "accuracy"),
    [("\\text {5 cm}", "5 cm", 1.0), ("\\mathrm {Yes}", "yes", 1.0), ("\\text  { blue }", "blue", 1.0)]
    + [("\\text {6 cm}", "5 cm", 0.0)],
)
def test_class4_text_wrappers_with_a_space_before_the_brace(
    prediction: str, ground_truth: str, accuracy: float
) -> None:
    assert mm_gad_accuracy(prediction, ground_truth) == accuracy


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "accuracy"),
    [
        ("5Kg; 1", "5 kg; 1", 1.0),
        ("10 students; 3", "10; 3", 1.0),
        ("8 Pieces", "8", 1.0),
        ("4 Hours; 2 MIN", "4; 2", 1.0),
        ("6 plates", "6", 1.0),
        ("2x cm", "2x CM", 1.0),  # (iv): case
        ("x kg", "x", 0.0),  # units count only right after a digit
    ],
)
def test_class5_units_are_the_reference_list_in_any_case(prediction: str, ground_truth: str, accuracy: float) -> None:
    assert mm_gad_accuracy(prediction, ground_truth) == accuracy


def test_class5_words_outside_the_list_are_no_units() -> None:
    # Relaxed match only: math-verify (the last step, as in the reference) reads the number out of "2 dollars".
    assert not relaxed_match("2 dollars", "2")
    assert not relaxed_match("5 m", "5")  # a bare m is not a unit
    assert relaxed_match("5 MIN", "5")


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "accuracy"),
    [
        ("A", "(a) 5", 1.0),
        ("(c)", "c. 12", 1.0),
        ("The answer is (b)", "(b) x + 1", 1.0),
        ("B", "(a) 5", 0.0),
        # multi-part answers are judged part by part, never as one option letter
        ("(a) 4 (b) 3", "(a) 4 (b) 3", 1.0),
        ("(a) 4 (b) 3", "4; 3", 1.0),
        ("(a) 5 (b) 7", "(a) 4 (b) 3", 0.0),
        ("A", "(a) 4 (b) 3", 0.0),
        ("(a) 4 (b) 3", "A", 0.0),
        ("(A) 12 (B) 15", "A", 0.0),
    ],
)
def test_class6_lower_case_labels(prediction: str, ground_truth: str, accuracy: float) -> None:
    assert mm_gad_accuracy(prediction, ground_truth) == accuracy


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "accuracy"),
    [("f(A)", "A", 0.0), ("B.5", "B", 0.0), ("g(C) = 1", "C", 0.0), ("xB.", "B", 0.0), ("so (B).", "B", 1.0)],
)
def test_class7_glued_letters_are_not_options(prediction: str, ground_truth: str, accuracy: float) -> None:
    assert mm_gad_accuracy(prediction, ground_truth) == accuracy


def test_reference_mistakes_we_keep_fixed() -> None:
    assert mm_gad_accuracy("(.5, 2)", "(0.5, 2)") == 1.0  # Decision 1
    assert mm_gad_accuracy("\\rightarrow", "\\leftarrow") == 0.0  # Decision 2
    assert mm_gad_accuracy("x=1.5", "x=15") == 0.0  # Decision 3
    assert mm_gad_accuracy("NaN", "nan") == 1.0  # Decision 4
    assert mm_gad_accuracy("inf", "Infinity") == 0.0  # not numbers; nor equal as text or for math-verify


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "accuracy"),
    [
        # Decision 6: on bare text math-verify reads one number out of anything; only whole reads count
        ("3 or 4", "4", 0.0),
        ("2x^7", "2x^5", 0.0),
        ("2\\sqrt{2}", "2", 0.0),
        ("2", "2x-4", 0.0),
        ("y = 7x + 1", "y = 3x + 1", 0.0),
        # what it reads whole still counts: a name, an option label, a percent or a unit around the value
        ("x=2", "2", 1.0),
        ("(E) 12", "12", 1.0),
        ("50%", "0.5", 1.0),
        ("0.5 cm", "\\frac{1}{2}", 1.0),
        ("\\frac{1}{2}", "C. 0.5", 1.0),  # the option's value, as in the reference
    ],
)
def test_math_verify_counts_only_whole_reads(prediction: str, ground_truth: str, accuracy: float) -> None:
    assert mm_gad_accuracy(prediction, ground_truth) == accuracy


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
