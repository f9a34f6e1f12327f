"""Questions of the embedded task, with verifiable answers and step-by-step solutions computed from the scene.

Each question type pairs an `ask` (draw a question about a scene; None when the type does not fit the scene, e.g. no
unique tallest bar) with a `solve` (answer it from a scene: the true scene for the teacher, a misperceived one for the
weaker "public" demonstrator; None when the question has no answer in that scene). Answers are bare integers,
`Yes`/`No`, or an option letter `A`-`D`, all forms the rule reward (PRISM_SPEC §6.2) grades exactly.

Easy types read one thing off the image; hard types combine several (sums, differences, comparisons, multiple
choice): the alignment subset uses hard types only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prism_mcore.data.embedded.scenes import COLORS, SHAPES, BarsScene, DigitsScene, Scene, ShapesScene, plural

OPTION_LETTERS = "ABCD"


@dataclass(frozen=True)
class Question:
    task: str  # "<scene kind>/<question type>", e.g. "bars/tallest"
    text: str  # as the user sees it, choices included
    params: dict[str, Any]  # what the question is about (JSON-serialisable), enough to solve it on any scene
    hard: bool  # combines several facts (sum, difference, comparison, multiple choice) rather than reading one


@dataclass(frozen=True)
class Solution:
    steps: tuple[str, ...]  # reasoning lines
    answer: str


Asked = tuple[str, dict[str, Any]]  # what an `ask` function returns: the question text and its params


@dataclass(frozen=True)
class QuestionType:
    kind: str  # the scene kind it applies to
    name: str
    hard: bool
    ask: Callable[[Any, random.Random], Asked | None]
    solve: Callable[[Any, dict[str, Any]], Solution | None]

    @property
    def task(self) -> str:
        return f"{self.kind}/{self.name}"

    def draw(self, scene: Scene, rng: random.Random) -> Question | None:
        """A question of this type about `scene`, or None when the type does not fit the scene."""
        asked = self.ask(scene, rng)
        return None if asked is None else Question(self.task, *asked, hard=self.hard)


def _sum_line(label: str, values: list[int]) -> str:
    """`Total: 2 + 1 = 3.`; a single value is stated as is."""
    if len(values) == 1:
        return f"{label}: {values[0]}."
    return f"{label}: {' + '.join(map(str, values))} = {sum(values)}."


def _listing(items: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _multiple_choice(stem: str, options: list[str], rng: random.Random) -> tuple[str, list[str]]:
    """The question text with (A)-(D) choices in a random order, and that order."""
    order = rng.sample(options, len(options))
    choices = " ".join(f"({letter}) {option}" for letter, option in zip(OPTION_LETTERS, order, strict=True))
    return f"{stem}\nChoices: {choices}", order


def _option_solution(steps: list[str], chosen: str, choices: list[str]) -> Solution:
    letter = OPTION_LETTERS[choices.index(chosen)]
    return Solution((*steps, f"{chosen} is option ({letter})."), letter)


def _unique_argmax(values: list[int]) -> int | None:
    best = max(values)
    return values.index(best) if values.count(best) == 1 else None


# ---------------------------------------------------------------------------------------------------------------------
# Shapes


def _ask_count_group(scene: ShapesScene, rng: random.Random) -> Asked:
    present = sorted({(o.color, o.shape) for o in scene.objects})
    # Mostly ask about a group that is there; sometimes about one that is not (answer 0).
    color, shape = rng.choice(present) if rng.random() < 0.85 else (rng.choice(list(COLORS)), rng.choice(SHAPES))
    text = rng.choice((f"How many {color} {shape}s are there?", f"Count the {color} {shape}s in the image."))
    return (text, {"color": color, "shape": shape})


def _solve_count_group(scene: ShapesScene, params: dict[str, Any]) -> Solution:
    count = scene.count(params["color"], params["shape"])
    return Solution((f"Look for {params['color']} {params['shape']}s.", f"Count: {count}."), str(count))


def _ask_count_shape(scene: ShapesScene, rng: random.Random) -> Asked:
    shape = rng.choice(SHAPES)
    return (f"How many {shape}s are there?", {"shape": shape})


def _solve_count_shape(scene: ShapesScene, params: dict[str, Any]) -> Solution:
    shape = params["shape"]
    groups = [(c, scene.count(c, shape)) for c in COLORS if scene.count(c, shape)]
    if not groups:
        return Solution((f"There are no {shape}s.", "Total: 0."), "0")
    counts = [n for _, n in groups]
    listed = _listing([f"{n} {color}" for color, n in groups])
    return Solution((f"{shape.capitalize()}s by colour: {listed}.", _sum_line("Total", counts)), str(sum(counts)))


def _ask_count_all(scene: ShapesScene, rng: random.Random) -> Asked:
    return (rng.choice(("How many shapes are there in total?", "How many objects does the picture show?")), {})


def _solve_count_all(scene: ShapesScene, params: dict[str, Any]) -> Solution:
    counts = [(s, scene.count(shape=s)) for s in SHAPES if scene.count(shape=s)]
    listed = _listing([plural(n, s) for s, n in counts])
    return Solution((f"There are {listed}.", _sum_line("Total", [n for _, n in counts])), str(len(scene.objects)))


def _ask_compare_colors(scene: ShapesScene, rng: random.Random) -> Asked:
    first = rng.choice([o.color for o in scene.objects])
    second = rng.choice([c for c in COLORS if c != first])
    first, second = (first, second) if rng.random() < 0.5 else (second, first)
    text = f"Are there more {first} shapes than {second} shapes?"
    return (text, {"first": first, "second": second})


def _solve_compare_colors(scene: ShapesScene, params: dict[str, Any]) -> Solution:
    a, b = scene.count(params["first"]), scene.count(params["second"])
    verdict = f"{a} > {b}, so yes." if a > b else f"{a} is not more than {b}, so no."
    return Solution(
        (f"{params['first']} shapes: {a}.", f"{params['second']} shapes: {b}.", verdict), "Yes" if a > b else "No"
    )


def _ask_sum_shapes(scene: ShapesScene, rng: random.Random) -> Asked:
    first, second = rng.sample(SHAPES, 2)
    text = f"How many {first}s and {second}s are there together?"
    return (text, {"first": first, "second": second})


def _solve_sum_shapes(scene: ShapesScene, params: dict[str, Any]) -> Solution:
    a, b = scene.count(shape=params["first"]), scene.count(shape=params["second"])
    steps = (f"{params['first']}s: {a}.", f"{params['second']}s: {b}.", f"Total: {a} + {b} = {a + b}.")
    return Solution(steps, str(a + b))


def _ask_color_of(scene: ShapesScene, rng: random.Random) -> Asked | None:
    single = [s for s in SHAPES if scene.count(shape=s) == 1]
    if not single:
        return None
    shape = rng.choice(single)
    text, choices = _multiple_choice(f"What colour is the {shape}?", list(COLORS), rng)
    return (text, {"shape": shape, "choices": choices})


def _solve_color_of(scene: ShapesScene, params: dict[str, Any]) -> Solution | None:
    matches = [o for o in scene.objects if o.shape == params["shape"]]
    if len(matches) != 1:
        return None
    color = matches[0].color
    return _option_solution([f"There is one {params['shape']}.", f"It is {color}."], color, params["choices"])


# ---------------------------------------------------------------------------------------------------------------------
# Digits


def _ask_read_digit(scene: DigitsScene, rng: random.Random) -> Asked:
    position = rng.choice(scene.positions)
    return (f"What is the {position} digit?", {"position": position})


def _solve_read_digit(scene: DigitsScene, params: dict[str, Any]) -> Solution:
    value = scene.digits[scene.positions.index(params["position"])].value
    return Solution((f"The {params['position']} digit is {value}.",), str(value))


def _ask_sum_digits(scene: DigitsScene, rng: random.Random) -> Asked:
    return (rng.choice(("What is the sum of the digits?", "What do the digits add up to?")), {})


def _solve_sum_digits(scene: DigitsScene, params: dict[str, Any]) -> Solution:
    values = scene.values
    steps = (f"The digits are {_listing([str(v) for v in values])}.", _sum_line("Sum", values))
    return Solution(steps, str(sum(values)))


def _ask_range(scene: DigitsScene, rng: random.Random) -> Asked:
    return ("What is the largest digit minus the smallest digit?", {})


def _solve_range(scene: DigitsScene, params: dict[str, Any]) -> Solution:
    values = scene.values
    high, low = max(values), min(values)
    steps = (f"The digits are {_listing([str(v) for v in values])}.", f"{high} - {low} = {high - low}.")
    return Solution(steps, str(high - low))


def _ask_color_of_largest(scene: DigitsScene, rng: random.Random) -> Asked | None:
    if _unique_argmax(scene.values) is None:
        return None
    text, choices = _multiple_choice("What colour is the largest digit?", list(COLORS), rng)
    return (text, {"choices": choices})


def _solve_color_of_largest(scene: DigitsScene, params: dict[str, Any]) -> Solution | None:
    index = _unique_argmax(scene.values)
    if index is None:
        return None
    largest = scene.digits[index]
    seen = _listing([f"{d.color} {d.value}" for d in scene.digits])
    steps = [f"The digits are {seen}.", f"The largest is {largest.value}, in {largest.color}."]
    return _option_solution(steps, largest.color, params["choices"])


# ---------------------------------------------------------------------------------------------------------------------
# Bars


def _ask_bar_value(scene: BarsScene, rng: random.Random) -> Asked:
    color = rng.choice([b.color for b in scene.bars])
    text = rng.choice((f"What is the value of the {color} bar?", f"How high is the {color} bar?"))
    return (text, {"color": color})


def _solve_bar_value(scene: BarsScene, params: dict[str, Any]) -> Solution:
    value = scene.value_of(params["color"])
    return Solution((f"The {params['color']} bar reaches {value}.",), str(value))


def _ask_tallest(scene: BarsScene, rng: random.Random) -> Asked | None:
    if _unique_argmax([b.value for b in scene.bars]) is None:
        return None
    text, choices = _multiple_choice("Which bar is the tallest?", list(COLORS), rng)
    return (text, {"choices": choices})


def _solve_tallest(scene: BarsScene, params: dict[str, Any]) -> Solution | None:
    index = _unique_argmax([b.value for b in scene.bars])
    if index is None:
        return None
    tallest = scene.bars[index]
    values = _listing([f"{b.color} {b.value}" for b in scene.bars])
    steps = [f"Values: {values}.", f"The tallest is {tallest.color} ({tallest.value})."]
    return _option_solution(steps, tallest.color, params["choices"])


def _ask_bar_difference(scene: BarsScene, rng: random.Random) -> Asked | None:
    pairs = [(a.color, b.color) for a in scene.bars for b in scene.bars if a.value > b.value]
    if not pairs:
        return None
    larger, smaller = rng.choice(pairs)
    text = f"How much larger is the {larger} bar than the {smaller} bar?"
    return (text, {"larger": larger, "smaller": smaller})


def _solve_bar_difference(scene: BarsScene, params: dict[str, Any]) -> Solution:
    a, b = scene.value_of(params["larger"]), scene.value_of(params["smaller"])
    steps = (f"{params['larger']} bar: {a}.", f"{params['smaller']} bar: {b}.", f"{a} - {b} = {a - b}.")
    return Solution(steps, str(a - b))


def _ask_bar_total(scene: BarsScene, rng: random.Random) -> Asked:
    return (rng.choice(("What is the total of all bar values?", "What do the values of all bars add up to?")), {})


def _solve_bar_total(scene: BarsScene, params: dict[str, Any]) -> Solution:
    values = [b.value for b in scene.bars]
    steps = (f"Values: {_listing([str(v) for v in values])}.", _sum_line("Total", values))
    return Solution(steps, str(sum(values)))


# ---------------------------------------------------------------------------------------------------------------------
# Registry

QUESTION_TYPES: tuple[QuestionType, ...] = (
    QuestionType("shapes", "count_group", False, _ask_count_group, _solve_count_group),
    QuestionType("shapes", "count_shape", False, _ask_count_shape, _solve_count_shape),
    QuestionType("shapes", "count_all", False, _ask_count_all, _solve_count_all),
    QuestionType("shapes", "compare_colors", True, _ask_compare_colors, _solve_compare_colors),
    QuestionType("shapes", "sum_shapes", True, _ask_sum_shapes, _solve_sum_shapes),
    QuestionType("shapes", "color_of", True, _ask_color_of, _solve_color_of),
    QuestionType("digits", "read_digit", False, _ask_read_digit, _solve_read_digit),
    QuestionType("digits", "sum_digits", True, _ask_sum_digits, _solve_sum_digits),
    QuestionType("digits", "range", True, _ask_range, _solve_range),
    QuestionType("digits", "color_of_largest", True, _ask_color_of_largest, _solve_color_of_largest),
    QuestionType("bars", "bar_value", False, _ask_bar_value, _solve_bar_value),
    QuestionType("bars", "tallest", True, _ask_tallest, _solve_tallest),
    QuestionType("bars", "bar_difference", True, _ask_bar_difference, _solve_bar_difference),
    QuestionType("bars", "bar_total", True, _ask_bar_total, _solve_bar_total),
)
_BY_TASK = {qt.task: qt for qt in QUESTION_TYPES}


def question_types(kind: str, hard_only: bool = False) -> list[QuestionType]:
    return [qt for qt in QUESTION_TYPES if qt.kind == kind and (qt.hard or not hard_only)]


def solve(scene: Scene, question: Question) -> Solution | None:
    """Answer `question` from `scene`, with the reasoning steps; None if it has no answer in that scene."""
    question_type = _BY_TASK[question.task]
    if question_type.kind != scene.kind:
        raise ValueError(f"question {question.task} does not apply to a {scene.kind} scene")
    return question_type.solve(scene, question.params)
