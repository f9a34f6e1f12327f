"""The embedded task's splits: scenes with questions, teacher demonstrations and weaker "public" demonstrations.

The teacher sees the true scene: a dense caption (every object), every reasoning step, the correct answer. The
public demonstrator, whose responses are the SFT data, plays the role of PRISM's lower-fidelity public corpus: it
sometimes misperceives the scene (one object missed, added or misread, and it then reasons correctly from what it
saw, so its caption and answer are consistently wrong), sometimes writes a terse one-line caption, and sometimes
skips to the last reasoning step. SFT on it therefore leaves the policy short of the teacher distribution, which is
the gap Stage 2 closes.

Splits are drawn in a fixed order (test, val, rl, align, warmup, sft), each from its own seeded generator, and no
two examples anywhere share a scene's content, so evaluation images and questions never occur in training and the
held-out splits do not change when the training splits are resized.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

from prism_mcore.data.embedded.questions import Question, question_types, solve
from prism_mcore.data.embedded.scenes import SCENE_KINDS, Scene, content_key, misperceive, sample_scene
from prism_mcore.data.prompts import Response

KIND_WEIGHTS = (0.4, 0.3, 0.3)  # shapes, digits, bars


@dataclass(frozen=True)
class Degradation:
    """How a public demonstration falls short of the teacher's."""

    misperceive: bool = False
    terse_caption: bool = False
    skip_steps: bool = False


@dataclass(frozen=True)
class PublicStyle:
    """How often the public demonstrator falls short, per kind of shortfall."""

    misperceive: float = 0.25
    terse_caption: float = 0.4
    skip_steps: float = 0.4

    def sample(self, rng: random.Random) -> Degradation:
        return Degradation(
            misperceive=rng.random() < self.misperceive,
            terse_caption=rng.random() < self.terse_caption,
            skip_steps=rng.random() < self.skip_steps,
        )


@dataclass(frozen=True)
class TaskSizes:
    """Examples per split."""

    sft: int = 3000
    warmup: int = 800
    align: int = 400
    rl: int = 400
    val: int = 150
    test: int = 150


@dataclass(frozen=True)
class Example:
    uid: str
    split: str
    scene: Scene
    question: Question
    teacher: Response
    # The public-style SFT target in the sft split, the student side of the pair in the warmup split, else None.
    demonstration: Response | None = None


def teacher_response(scene: Scene, question: Question) -> Response:
    solution = solve(scene, question)
    if solution is None:
        raise ValueError(f"{question.task} has no answer for this scene")
    return Response(scene.caption_lines(), solution.steps, solution.answer)


def perceive(scene: Scene, degradation: Degradation, rng: random.Random) -> Scene:
    """The scene as the public demonstrator sees it."""
    return misperceive(scene, rng) if degradation.misperceive else scene


def public_response(scene: Scene, seen: Scene, question: Question, degradation: Degradation) -> Response:
    """The public demonstrator's response to `question` about `scene`, which it perceived as `seen`."""
    solution = solve(seen, question)
    if solution is None:  # the misperception makes the question ill-posed (say, a tie): perceive correctly
        seen, solution = scene, solve(scene, question)
    caption_lines = seen.caption_lines()
    return Response(
        caption_lines[:1] if degradation.terse_caption else caption_lines,
        solution.steps[-1:] if degradation.skip_steps else solution.steps,
        solution.answer,
    )


def student_response(scene: Scene, question: Question, style: PublicStyle, rng: random.Random) -> Response:
    """A public-style response that differs from the teacher's in both segments, for a pairwise warmup example.

    A caption that came out equal to the teacher's is made terse, and a CoT that came out equal skips steps; warmup
    questions are hard ones, whose solutions have at least two steps, so skipping always changes the CoT.
    """
    teacher = teacher_response(scene, question)
    degradation = style.sample(rng)
    seen = perceive(scene, degradation, rng)
    response = public_response(scene, seen, question, degradation)
    degradation = replace(
        degradation,
        terse_caption=degradation.terse_caption or response.caption == teacher.caption,
        skip_steps=degradation.skip_steps or response.cot == teacher.cot,
    )
    return public_response(scene, seen, question, degradation)


@dataclass(frozen=True)
class _SplitPlan:
    name: str
    size: int
    hard: bool  # hard scenes and hard question types only
    demonstration: Literal["public", "student", ""]  # "": none


def _plans(sizes: TaskSizes) -> list[_SplitPlan]:
    return [
        _SplitPlan("test", sizes.test, hard=False, demonstration=""),
        _SplitPlan("val", sizes.val, hard=False, demonstration=""),
        _SplitPlan("rl", sizes.rl, hard=False, demonstration=""),
        _SplitPlan("align", sizes.align, hard=True, demonstration=""),
        _SplitPlan("warmup", sizes.warmup, hard=True, demonstration="student"),
        _SplitPlan("sft", sizes.sft, hard=False, demonstration="public"),
    ]


def generate_task(sizes: TaskSizes, seed: int, style: PublicStyle | None = None) -> dict[str, list[Example]]:
    """All splits of the task, deterministically from `seed`."""
    style = style or PublicStyle()
    seen_content: set[str] = set()
    splits: dict[str, list[Example]] = {}
    for plan in _plans(sizes):
        rng = random.Random(f"prism-embedded/{seed}/{plan.name}")
        examples: list[Example] = []
        while len(examples) < plan.size:
            kind = rng.choices(SCENE_KINDS, weights=KIND_WEIGHTS)[0]
            scene = sample_scene(kind, rng, hard=plan.hard)
            key = content_key(scene)
            if key in seen_content:
                continue
            question = rng.choice(question_types(kind, hard_only=plan.hard)).draw(scene, rng)
            if question is None:
                continue
            seen_content.add(key)
            demonstration = None
            if plan.demonstration == "public":
                degradation = style.sample(rng)
                demonstration = public_response(scene, perceive(scene, degradation, rng), question, degradation)
            elif plan.demonstration == "student":
                demonstration = student_response(scene, question, style, rng)
            uid = f"{plan.name}-{len(examples):05d}"
            examples.append(Example(uid, plan.name, scene, question, teacher_response(scene, question), demonstration))
        splits[plan.name] = examples
    return splits
