"""Caption faithfulness: which facts a caption states, and how many of them are true (the drift report's perception
part, PRISM_SPEC §1: the caption is the perception segment).

A caption is read as its bullet lines (`- ` dropped, stripped). A checker turns a sample's caption into a `FactCheck`:
how many facts the caption states, how many of those are true, and how many true facts there are. Summed over
captions these give micro precision (true stated / stated) and recall (true stated / true): a terse caption states
few facts (recall falls), a misperceived one states false facts (precision falls).

Checkers are registered per `data_source`, as reward judges are (`register_caption_checker`):
- `mm_gad` (the embedded task, whose rows carry the true scene as JSON in `extra_info.scene`): facts read off the scene
  itself. Shapes: one fact per (colour, shape) with its count; digits: the number of digits and one fact per
  (position, colour, value); bars: the number of bars and one fact per (colour, value). A line that names no such
  fact (the background line) states nothing; a line that names one with a wrong count or value states a false fact.
  Rows without a scene (real mm_gad data) fall back to the teacher;
- any other source, or a checker that cannot decide: the teacher caption as the reference, line by line (a stated line
  is true when the teacher's caption has it, as a multiset; the teacher's lines are the true facts).
A sample with neither a checker's verdict nor a teacher caption is not checked (None).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from prism_mcore.record import Sample
from prism_mcore.rewards.response_format import CAPTION_CLOSE, CAPTION_OPEN
from prism_mcore.rewards.verifiable import DEFAULT_DATA_SOURCE

_CAPTION = re.compile(re.escape(CAPTION_OPEN) + r"(.*?)" + re.escape(CAPTION_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class FactCheck:
    """One caption against its reference: facts stated, of those the true ones, and the reference's true facts."""

    stated: int
    correct: int
    true: int
    reference: str  # "scene" or "teacher": what the caption was checked against

    @property
    def exact(self) -> bool:
        """The caption states every true fact and nothing else."""
        return self.correct == self.stated == self.true


CaptionChecker = Callable[[list[str], Sample], FactCheck | None]


def caption_text(response: str) -> str | None:
    """The content of the first `<caption>…</caption>` of a response or a teacher caption; None without one."""
    match = _CAPTION.search(response)
    return match.group(1) if match else None


def caption_bullets(caption: str) -> list[str]:
    """The non-empty lines of a caption's content, each without its `- ` bullet and surrounding spaces."""
    lines = (line.strip() for line in caption.splitlines())
    return [line[1:].strip() if line.startswith("-") else line for line in lines if line]


def _bags_check(stated: Counter, true: Counter, reference: str) -> FactCheck:
    return FactCheck(sum(stated.values()), sum((stated & true).values()), sum(true.values()), reference)


def teacher_check(lines: list[str], teacher_caption: str) -> FactCheck:
    """`lines` against the teacher caption's bullet lines (each a fact; compared as multisets, case and a trailing
    full stop ignored)."""

    def normal(line: str) -> str:
        return line.lower().rstrip(".").strip()

    teacher = caption_bullets(caption_text(teacher_caption) or teacher_caption)
    return _bags_check(Counter(map(normal, lines)), Counter(map(normal, teacher)), "teacher")


# --- the embedded task's scenes --------------------------------------------------------------------------------------

_WORD = r"([a-z]+)"
_SHAPE_LINE = re.compile(r"^(\d+) ([a-z]+) (circle|square|triangle)s?\.?$")
_DIGIT_COUNT_LINE = re.compile(r"^(\d+) coloured digits\b")
_DIGIT_LINE = re.compile(rf"^(left|middle|right): {_WORD} (\d+)\.?$")
_BAR_COUNT_LINE = re.compile(r"^a bar chart with (\d+) bars\b")
_BAR_LINE = re.compile(rf"^{_WORD} bar: (\d+)\.?$")
_DIGIT_POSITIONS = {2: ("left", "right"), 3: ("left", "middle", "right")}


def _scene_facts(scene: dict) -> Counter:
    """The true facts of an embedded scene (its JSON from `extra_info.scene`)."""
    kind = scene["kind"]
    if kind == "shapes":
        counts = Counter((o["color"], o["shape"]) for o in scene["objects"])
        return Counter(("shape", color, shape, str(n)) for (color, shape), n in counts.items())
    if kind == "digits":
        positions = _DIGIT_POSITIONS.get(len(scene["digits"]), ())
        facts = [("digit", p, d["color"], str(d["value"])) for p, d in zip(positions, scene["digits"], strict=False)]
        return Counter([("digits", str(len(scene["digits"]))), *facts])
    if kind == "bars":
        facts = [("bar", b["color"], str(b["value"])) for b in scene["bars"]]
        return Counter([("bars", str(len(scene["bars"]))), *facts])
    raise ValueError(f"unknown embedded scene kind {kind!r}")


def _stated_facts(lines: list[str]) -> Counter:
    """The scene facts a caption's lines state, in `_scene_facts`' form; other lines state none."""
    facts: Counter = Counter()
    for line in (line.lower() for line in lines):
        if match := _SHAPE_LINE.match(line):
            facts[("shape", match[2], match[3], match[1])] += 1
        elif match := _DIGIT_COUNT_LINE.match(line):
            facts[("digits", match[1])] += 1
        elif match := _DIGIT_LINE.match(line):
            facts[("digit", match[1], match[2], match[3])] += 1
        elif match := _BAR_COUNT_LINE.match(line):
            facts[("bars", match[1])] += 1
        elif match := _BAR_LINE.match(line):
            facts[("bar", match[1], match[2])] += 1
    return facts


def embedded_scene_check(lines: list[str], sample: Sample) -> FactCheck | None:
    """`lines` against the true scene of an embedded-task row; None when the row carries no scene."""
    scene = sample.extra_info.get("scene") if sample.extra_info else None
    if not scene:
        return None
    return _bags_check(_stated_facts(lines), _scene_facts(json.loads(scene)), "scene")


_CHECKERS: dict[str, CaptionChecker] = {"mm_gad": embedded_scene_check}


def register_caption_checker(data_source: str, checker: CaptionChecker) -> None:
    """Make `checker` score the captions of samples from `data_source` (None from it: the teacher fallback)."""
    if data_source in _CHECKERS:
        raise ValueError(
            f"data_source {data_source!r} already has a caption checker: {_CHECKERS[data_source].__name__}"
        )
    _CHECKERS[data_source] = checker


def check_caption(sample: Sample) -> FactCheck | None:
    """The sample's response caption checked by its source's checker, else against its teacher caption; None when
    neither applies. A response without a caption states no fact."""
    caption = caption_text(sample.response_text)
    lines = caption_bullets(caption) if caption is not None else []
    checker = _CHECKERS.get(sample.data_source or DEFAULT_DATA_SOURCE)
    result = checker(lines, sample) if checker is not None else None
    if result is None and sample.teacher_caption:
        result = teacher_check(lines, sample.teacher_caption)
    return result
