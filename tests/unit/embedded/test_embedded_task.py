"""The synthetic task: images show what their scenes say, answers are right by construction (re-derived here from
the scene alone), demonstrations fall short at the configured rates, splits are disjoint and deterministic."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

import pytest
from PIL import Image

from prism_mcore.data.embedded import DEFAULT_SEED
from prism_mcore.data.embedded.questions import QUESTION_TYPES
from prism_mcore.data.embedded.scenes import (
    BACKGROUND,
    COLORS,
    DIGIT_CENTERS,
    DIGIT_HEIGHT,
    DIGIT_WIDTH,
    SEGMENTS,
    UNIT,
    bar_box,
    content_key,
    misperceive,
    render,
    sample_scene,
    scene_from_dict,
    scene_to_dict,
)
from prism_mcore.data.embedded.task import Example, PublicStyle, TaskSizes, generate_task


def _letter(choices: list[str], option: str) -> str:
    return "ABCD"[choices.index(option)]


def expected_answer(scene: dict[str, Any], task: str, params: dict[str, Any]) -> str:
    """The answer, derived from the scene description only (independently of the task's solvers)."""
    kind, name = task.split("/")
    if kind == "shapes":
        objects = scene["objects"]

        def count(**match: str) -> int:
            return sum(all(o[key] == value for key, value in match.items()) for o in objects)

        if name == "count_group":
            return str(count(color=params["color"], shape=params["shape"]))
        if name == "count_shape":
            return str(count(shape=params["shape"]))
        if name == "count_all":
            return str(len(objects))
        if name == "compare_colors":
            return "Yes" if count(color=params["first"]) > count(color=params["second"]) else "No"
        if name == "sum_shapes":
            return str(count(shape=params["first"]) + count(shape=params["second"]))
        if name == "color_of":
            (color,) = [o["color"] for o in objects if o["shape"] == params["shape"]]
            return _letter(params["choices"], color)
    if kind == "digits":
        digits = scene["digits"]
        values = [d["value"] for d in digits]
        if name == "read_digit":
            positions = ["left", "right"] if len(digits) == 2 else ["left", "middle", "right"]
            return str(values[positions.index(params["position"])])
        if name == "sum_digits":
            return str(sum(values))
        if name == "range":
            return str(max(values) - min(values))
        if name == "color_of_largest":
            (largest,) = [d for d in digits if d["value"] == max(values)]
            return _letter(params["choices"], largest["color"])
    if kind == "bars":
        values = {b["color"]: b["value"] for b in scene["bars"]}
        if name == "bar_value":
            return str(values[params["color"]])
        if name == "tallest":
            (tallest,) = [c for c, v in values.items() if v == max(values.values())]
            return _letter(params["choices"], tallest)
        if name == "bar_difference":
            return str(values[params["larger"]] - values[params["smaller"]])
        if name == "bar_total":
            return str(sum(values.values()))
    raise AssertionError(f"unknown task {task}")


def _all_examples(task: dict[str, list[Example]]) -> list[Example]:
    return [example for examples in task.values() for example in examples]


def test_teacher_answers_are_correct(task: dict[str, list[Example]]) -> None:
    for example in _all_examples(task):
        scene = json.loads(json.dumps(scene_to_dict(example.scene)))  # as stored in extra_info
        expected = expected_answer(scene, example.question.task, example.question.params)
        assert example.teacher.answer == expected, example.uid
        assert example.teacher.reasoning_lines[-1].endswith(".")


def test_multiple_choice_text_lists_the_choices_in_order(task: dict[str, list[Example]]) -> None:
    choice_questions = [e.question for e in _all_examples(task) if "choices" in e.question.params]
    assert len(choice_questions) > 100
    for question in choice_questions:
        assert sorted(question.params["choices"]) == sorted(COLORS)
        listed = " ".join(f"({letter}) {c}" for letter, c in zip("ABCD", question.params["choices"], strict=True))
        assert question.text.endswith(f"\nChoices: {listed}")


def test_scene_json_round_trip(task: dict[str, list[Example]]) -> None:
    for example in _all_examples(task)[:500]:
        assert scene_from_dict(json.loads(json.dumps(scene_to_dict(example.scene)))) == example.scene


def _corner_pixels(image: Image.Image, cx: int, cy: int) -> tuple[bool, bool]:
    """Whether the upper-left and lower-left corners of a 16x16 box around (cx, cy) are painted."""
    return image.getpixel((cx - 8, cy - 8)) != BACKGROUND, image.getpixel((cx - 8, cy + 8)) != BACKGROUND


@pytest.mark.parametrize("hard", [False, True])
def test_shapes_are_drawn_where_and_as_described(hard: bool) -> None:
    rng = random.Random(1)
    corners = {"square": (True, True), "triangle": (False, True), "circle": (False, False)}
    for _ in range(50):
        scene = sample_scene("shapes", rng, hard)
        image = render(scene)
        assert image.size == (96, 96)
        for obj, (dx, dy) in zip(scene.objects, scene.offsets, strict=True):
            row, col = divmod(obj.cell, 3)
            cx, cy = 32 * col + 16 + dx, 32 * row + 16 + dy
            assert image.getpixel((cx, cy)) == COLORS[obj.color]
            assert _corner_pixels(image, cx, cy) == corners[obj.shape]
        for cell in set(range(9)) - {o.cell for o in scene.objects}:
            row, col = divmod(cell, 3)
            assert image.getpixel((32 * col + 16, 32 * row + 16)) == BACKGROUND


def test_digits_light_exactly_their_segments() -> None:
    rng = random.Random(2)
    w, h = DIGIT_WIDTH, DIGIT_HEIGHT
    # One pixel inside each segment, relative to the digit's top-left corner.
    probes = {
        "a": (w // 2, 1),
        "b": (w - 2, h // 4),
        "c": (w - 2, 3 * h // 4),
        "d": (w // 2, h - 2),
        "e": (1, 3 * h // 4),
        "f": (1, h // 4),
        "g": (w // 2, h // 2),
    }
    for _ in range(50):
        scene = sample_scene("digits", rng)
        image = render(scene)
        assert image.size == (96, 64)
        centers = DIGIT_CENTERS[len(scene.digits)]
        for digit, center, (dx, dy) in zip(scene.digits, centers, scene.offsets, strict=True):
            x0, y0 = center - w // 2 + dx, (64 - h) // 2 + dy
            for segment, (px, py) in probes.items():
                lit = segment in SEGMENTS[digit.value]
                assert image.getpixel((x0 + px, y0 + py)) == (COLORS[digit.color] if lit else BACKGROUND)


def test_bars_are_as_high_as_their_values() -> None:
    rng = random.Random(3)
    for _ in range(50):
        scene = sample_scene("bars", rng)
        image = render(scene)
        assert image.size == (112, 112)
        for index, bar in enumerate(scene.bars):
            x0, _, x1, _ = bar_box(scene, index)
            column = [image.getpixel(((x0 + x1) // 2, y)) for y in range(112)]
            assert column.count(COLORS[bar.color]) == bar.value * UNIT


@pytest.mark.parametrize("kind", ["shapes", "digits", "bars"])
def test_misperception_always_changes_the_content(kind: str) -> None:
    rng = random.Random(4)
    for _ in range(200):
        scene = sample_scene(kind, rng)
        assert content_key(misperceive(scene, rng)) != content_key(scene)


def test_splits_have_their_sizes_and_share_no_scene(task: dict[str, list[Example]]) -> None:
    sizes = TaskSizes()
    assert {name: len(examples) for name, examples in task.items()} == {
        "test": sizes.test,
        "val": sizes.val,
        "rl": sizes.rl,
        "align": sizes.align,
        "warmup": sizes.warmup,
        "sft": sizes.sft,
    }
    examples = _all_examples(task)
    assert len({content_key(e.scene) for e in examples}) == len(examples)
    assert task["val"][7].uid == "val-00007"
    assert len({e.uid for e in examples}) == len(examples)


def test_every_question_type_is_trained_and_evaluated(task: dict[str, list[Example]]) -> None:
    all_tasks = {qt.task for qt in QUESTION_TYPES}
    hard_tasks = {qt.task for qt in QUESTION_TYPES if qt.hard}
    for split in ("sft", "rl", "val", "test"):
        assert {e.question.task for e in task[split]} == all_tasks, split
    for split in ("align", "warmup"):  # the harder subset
        assert {e.question.task for e in task[split]} == hard_tasks, split


def test_public_demonstrations_fall_short_at_the_configured_rates(task: dict[str, list[Example]]) -> None:
    sft = task["sft"]
    style = PublicStyle()
    assert all(e.demonstration is not None for e in sft)
    # Teacher captions have at least two lines (a style line and the objects); terse ones keep only the first.
    terse = sum(len(e.demonstration.caption_lines) == 1 for e in sft) / len(sft)
    assert abs(terse - style.terse_caption) < 0.05
    multi_step = [e for e in sft if len(e.teacher.reasoning_lines) > 1]
    skipped = sum(len(e.demonstration.reasoning_lines) == 1 for e in multi_step) / len(multi_step)
    assert abs(skipped - style.skip_steps) < 0.05
    # A misperception changes the answer only when it touches what the question asks about.
    wrong = sum(e.demonstration.answer != e.teacher.answer for e in sft) / len(sft)
    assert 0.05 < wrong < style.misperceive
    assert sum(e.demonstration == e.teacher for e in sft) / len(sft) > 0.1


def test_warmup_students_differ_from_the_teacher_in_both_segments(task: dict[str, list[Example]]) -> None:
    for example in task["warmup"]:
        assert example.demonstration.caption != example.teacher.caption
        assert example.demonstration.cot != example.teacher.cot


def test_generation_is_deterministic_and_heldout_splits_ignore_training_sizes(
    task: dict[str, list[Example]],
) -> None:
    resized = generate_task(replace(TaskSizes(), sft=10, warmup=5), DEFAULT_SEED)
    for split in ("test", "val", "rl", "align"):
        assert resized[split] == task[split]
    assert generate_task(TaskSizes(), DEFAULT_SEED + 1)["val"] != task["val"]
