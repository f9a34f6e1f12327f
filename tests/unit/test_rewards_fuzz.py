"""Property-based fuzz of the `mm_gad` judge (PRISM_SPEC §6.2): generated ground truths, generated predictions, and
properties that must hold whatever the generator drew.

Plain `random` with fixed seeds (no extra dependency): each property runs on a few hundred generated cases, the same
ones on every run, so a failure names the case and reproduces. The properties:
- any string matches itself; a value matches itself however it is spaced or wrapped in math delimiters; a
  multiple-choice label matches however the prediction writes the same letter;
- a value never matches one that differs only by a sign, an operator or a digit, nor another option letter, nor the
  same parts in another order or with one part missing.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from prism_mcore.rewards.mm_gad_judge import MCQ_LETTERS, mm_gad_accuracy

CASES = 150  # per property; all properties together run in a few seconds


def _number(rng: random.Random) -> str:
    """A non-zero number with at most five significant digits (a one-digit change is then far above 1e-6)."""
    if rng.random() < 0.5:
        return str(rng.randint(1, 99999))
    whole, fraction = rng.randint(0, 999), rng.randint(1, 99)
    return f"{whole}.{fraction:02d}" if whole or fraction else "0.5"


def _fraction(rng: random.Random) -> str:
    numerator, denominator = rng.randint(1, 97), rng.randint(2, 98)
    while numerator % denominator == 0:
        numerator += 1
    return rf"\frac{{{numerator}}}{{{denominator}}}"


def _radical(rng: random.Random) -> str:
    radicand = rng.choice([2, 3, 5, 6, 7, 10, 11, 13])
    return rf"{rng.randint(2, 9)}\sqrt{{{radicand}}}"


def _value(rng: random.Random) -> str:
    """A single non-zero value: a number (maybe with a unit), a fraction or a radical."""
    kind = rng.randrange(4)
    if kind == 0:
        return _number(rng)
    if kind == 1:
        return f"{_number(rng)} {rng.choice(['cm', 'kg', 'm²', 'students', '°'])}"
    return _fraction(rng) if kind == 2 else _radical(rng)


def _expression(rng: random.Random, operator: str) -> str:
    """An expression in x whose value changes with every change of `operator`."""
    return f"{rng.choice(['x', 'y', '2x', '3a'])}{operator}{rng.randint(2, 9)}"


OPERATORS = ["+", "-", "*", "/", "^", "<", ">"]


def _run(property_check: Callable[[random.Random], tuple[str, str, float]], seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(CASES):
        prediction, ground_truth, expected = property_check(rng)
        assert mm_gad_accuracy(prediction, ground_truth) == expected, (prediction, ground_truth)


def _respaced(rng: random.Random, text: str) -> str:
    return " " * rng.randint(0, 2) + text + " " * rng.randint(0, 2)


def test_a_value_matches_itself_however_spaced_or_delimited() -> None:
    def check(rng: random.Random) -> tuple[str, str, float]:
        ground_truth = _value(rng) if rng.random() < 0.7 else _expression(rng, rng.choice(OPERATORS))
        prediction = rng.choice(["{}", "${}$", "\\({}\\)", "$$ {} $$"]).format(ground_truth)
        return _respaced(rng, prediction), ground_truth, 1.0

    _run(check, seed=1)


def test_a_sign_flip_never_matches() -> None:
    def check(rng: random.Random) -> tuple[str, str, float]:
        value = rng.choice([_number, _fraction, _radical])(rng)
        negated = "-" + value
        return (negated, value, 0.0) if rng.random() < 0.5 else (value, negated, 0.0)

    _run(check, seed=2)


def test_another_operator_never_matches() -> None:
    def check(rng: random.Random) -> tuple[str, str, float]:
        operator, other = rng.sample(OPERATORS, 2)
        left, right = rng.choice(["x", "y", "2x"]), str(rng.randint(2, 9))
        return f"{left}{other}{right}", f"{left}{operator}{right}", 0.0

    _run(check, seed=3)


def _change_a_digit(rng: random.Random, text: str) -> str:
    positions = [i for i, char in enumerate(text) if char.isdigit()]
    position = rng.choice(positions)
    replacement = rng.choice([digit for digit in "0123456789" if digit != text[position]])
    if replacement == "0" and (position == 0 or not text[position - 1].isdigit()):
        replacement = "1" if text[position] != "1" else "2"  # no new leading zero: "05" reads as 5
    return text[:position] + replacement + text[position + 1 :]


def test_another_digit_never_matches() -> None:
    def check(rng: random.Random) -> tuple[str, str, float]:
        ground_truth = _value(rng) if rng.random() < 0.7 else _expression(rng, rng.choice(OPERATORS))
        return _change_a_digit(rng, ground_truth), ground_truth, 0.0

    _run(check, seed=4)


def test_option_letters_match_only_their_own_letter() -> None:
    gt_forms = ["{}", "({}) 12", "{}. 3", "({}) x + 1", "{}. -2"]
    pred_forms = ["{}", "({})", "[{}]", "{}.", "{}:", " ( {} ) ", "The answer is {}", "Option: {}", "so ({}) it is"]

    def check(rng: random.Random) -> tuple[str, str, float]:
        letter, other = rng.sample(MCQ_LETTERS, 2)
        form = rng.choice(gt_forms)  # a bare label is upper case: a bare lower-case letter is a value
        ground_truth = form.format(letter if form == "{}" or rng.random() < 0.7 else letter.lower())
        chosen = letter if rng.random() < 0.5 else other
        written = chosen.lower() if rng.random() < 0.5 else chosen
        return rng.choice(pred_forms).format(written), ground_truth, float(chosen == letter)

    _run(check, seed=5)


def test_multi_part_answers_match_in_order_and_in_full_only() -> None:
    separators = ["; ", ";", " ；", ", "]

    def check(rng: random.Random) -> tuple[str, str, float]:
        parts = [_number(rng) for _ in range(rng.randint(2, 4))]
        while len(set(parts)) < len(parts):
            parts = [_number(rng) for _ in range(len(parts))]
        ground_truth = rng.choice(separators).join(parts)
        case = rng.randrange(4)
        if case == 0:  # the same parts, differently spaced, or numbered
            numbered = " ".join(f"({i + 1}) {part}" for i, part in enumerate(parts))
            prediction = numbered if rng.random() < 0.3 else rng.choice(separators).join(parts)
            return _respaced(rng, prediction), ground_truth, 1.0
        if case == 1:  # two parts swapped
            i, j = rng.sample(range(len(parts)), 2)
            swapped = parts[:]
            swapped[i], swapped[j] = swapped[j], swapped[i]
            return "; ".join(swapped), ground_truth, 0.0
        if case == 2:  # one part missing
            return "; ".join(parts[:-1]), ground_truth, 0.0
        changed = parts[:]  # one part off by a digit
        index = rng.randrange(len(parts))
        changed[index] = _change_a_digit(rng, changed[index])
        return "; ".join(changed), ground_truth, 0.0

    _run(check, seed=6)


def test_coordinates_match_in_order_only() -> None:
    def check(rng: random.Random) -> tuple[str, str, float]:
        x, y = rng.sample([-7, -2.5, 0, 0.25, 1, 3, 12], 2)
        ground_truth = f"({x}, {y})"
        if rng.random() < 0.5:
            # a comma between two digits is a thousands separator ("(2,3)" reads "(23)"), so a space follows it
            return f"( {x}, {y} )" if rng.random() < 0.5 else f"[{x},  {y}]", ground_truth, 1.0
        return f"({y}, {x})", ground_truth, 0.0

    _run(check, seed=7)


@pytest.mark.parametrize("seed", [11, 12])
def test_random_text_never_matches_a_different_number(seed: int) -> None:
    """Junk predictions (letters, operators, digits, brackets, tags of the answer's neighbours) against numbers."""
    alphabet = "abcxyz0123456789+-*/^=<>()[]{},;:. %\\"

    def check(rng: random.Random) -> tuple[str, str, float]:
        ground_truth = str(rng.randint(100, 999))
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        if ground_truth in junk.replace(" ", ""):
            junk = junk.replace(ground_truth[0], "a")
        return junk, ground_truth, 0.0

    _run(check, seed=seed)


def test_any_string_matches_itself() -> None:
    """Identity on junk too: numbered or lettered markers, brackets, delimiters, operators, option-like letters."""
    alphabet = "abcxyzABCH0123456789+-*/^=<>()[]{},;:. %\\$"

    def check(rng: random.Random) -> tuple[str, str, float]:
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        return text, text, 1.0

    _run(check, seed=13)
