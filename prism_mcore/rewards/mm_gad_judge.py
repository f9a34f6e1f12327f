"""The `mm_gad` rule judge: is an extracted answer right? (PRISM_SPEC §6.2)

`mm_gad_accuracy(answer, ground_truth)` is 1.0 or 0.0:
1. Both raw strings are split into parts (`split_multi_value`). If either has more than one part, the counts must
   match and every aligned pair must pass step 2 without the math-verify fallback (order matters).
2. A single value is compared after `simple_parse`: first as coordinate lists, then by `relaxed_match`, and last (only
   when neither side was split) by math-verify over the variants of both strings.

Interpretations where the spec leaves room, each chosen as the literal reading:
- empty parts are dropped after splitting (`"3;"` is one value);
- `simple_parse` removes every full-width comma `，` and every ASCII comma between two digits;
- the MCQ letter of a bare answer or of an "answer is L" phrase may be lower case; `(L)`/`L.`/`L)` tokens must be
  upper case (lower-case ones are ordinary words and list markers);
- "punctuation" is all of `string.punctuation` plus CJK punctuation, so `x+1` and `x-1` both read `x1` in step (iv):
  that is what the rule says, and numbers never reach it (step (iii) decides them).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

from prism_mcore.rewards.math_verify_runner import math_equivalent

MCQ_LETTERS = "ABCDEFGH"
NUMERIC_REL_TOL = 1e-6
COORDINATE_ABS_TOL = 1e-6

# --- step 1: multi-value split ---

_NUMBERED_MARKER = re.compile(r"\(\d+\)")
_SEMICOLON = re.compile(r"[;；]")
_OPENING, _CLOSING = "([{", ")]}"


def _top_level_comma_split(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in _OPENING:
            depth += 1
        elif char in _CLOSING:
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def split_multi_value(text: str) -> list[str]:
    """The parts of a possibly multi-valued answer, stripped and non-empty.

    Numbered markers `(1) … (2) …` when there are at least two and the first starts within the first 3 characters;
    else semicolons (ASCII or full-width) if they give at least two parts; else commas outside brackets.
    """
    markers = list(_NUMBERED_MARKER.finditer(text))
    if len(markers) >= 2 and markers[0].start() <= 2:
        ends = [marker.start() for marker in markers[1:]] + [len(text)]
        parts = [text[marker.end() : end] for marker, end in zip(markers, ends, strict=True)]
    else:
        parts = [part for part in _SEMICOLON.split(text) if part.strip()]
        if len(parts) < 2:
            parts = _top_level_comma_split(text)
    return [part.strip() for part in parts if part.strip()]


# --- step 2: simple parse ---

_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_STYLED_FRAC = re.compile(r"\\[dt]frac(?![A-Za-z])")
_TEXT_WRAPPER = re.compile(r"\\(?:text|mathrm)\{([^{}]*)\}")
_SIZED_DELIMITER = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SPACE_AFTER_BRACE = re.compile(r"\{\s+")
_SPACE_BEFORE_BRACE = re.compile(r"\s+\}")
_WHITESPACE_RUN = re.compile(r"\s+")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")


def strip_math_delimiters(text: str) -> str:
    """`text` stripped, without one outer pair of `$$`, `$`, `\\(\\)` or `\\[\\]`."""
    text = text.strip()
    for opening, closing in _MATH_DELIMITERS:
        if len(text) >= len(opening) + len(closing) and text.startswith(opening) and text.endswith(closing):
            return text[len(opening) : len(text) - len(closing)].strip()
    return text


def normalize_latex(text: str) -> str:
    """`\\dfrac`/`\\tfrac` → `\\frac`, `\\text{…}`/`\\mathrm{…}` unwrapped, `\\left`/`\\right` dropped, no spaces just
    inside braces, whitespace runs collapsed to one space."""
    text = _STYLED_FRAC.sub(r"\\frac", text)
    unwrapped = 1
    while unwrapped:  # innermost wrappers first, so nested ones unwrap too
        text, unwrapped = _TEXT_WRAPPER.subn(r"\1", text)
    text = _SIZED_DELIMITER.sub("", text)
    text = _SPACE_BEFORE_BRACE.sub("}", _SPACE_AFTER_BRACE.sub("{", text))
    return _WHITESPACE_RUN.sub(" ", text).strip()


def simple_parse(text: str) -> str:
    """The canonical form of one value: delimiters stripped, LaTeX normalised, digit-group commas and full-width
    commas removed, one trailing period removed."""
    text = normalize_latex(strip_math_delimiters(text))
    text = _DIGIT_COMMA.sub("", text).replace("，", "")
    return text.removesuffix(".").strip()


# --- step 2.1: coordinates ---

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_COORDINATE = re.compile(rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)")


def coordinates(text: str) -> list[tuple[float, float]]:
    """All `(x, y)` number pairs in `text`, in order."""
    return [(float(x), float(y)) for x, y in _COORDINATE.findall(text)]


def _same_coordinates(pred: list[tuple[float, float]], gt: list[tuple[float, float]]) -> bool:
    return len(pred) == len(gt) and all(
        math.isclose(p, g, rel_tol=0.0, abs_tol=COORDINATE_ABS_TOL)
        for pred_point, gt_point in zip(pred, gt, strict=True)
        for p, g in zip(pred_point, gt_point, strict=True)
    )


# --- step 2.2: relaxed match ---

_MCQ_PLAIN_GT = re.compile(rf"[{MCQ_LETTERS}]")
_MCQ_BRACKETED_GT = re.compile(rf"\(([{MCQ_LETTERS}])\)\s+.+", re.DOTALL)
# A letter and a period start an option only when a bracket, digit or sign follows: "B. 45°" is an option, "A. twelve"
# a sentence.
_MCQ_DOTTED_GT = re.compile(rf"([{MCQ_LETTERS}])\.\s+[(\[{{0-9+\-].+", re.DOTALL)

_BARE_LETTER = re.compile(rf"\s*[(\[{{]?\s*([{MCQ_LETTERS}])\s*[)\]}}]?\s*[.:]?\s*", re.IGNORECASE)
# (pattern, priority): an explicit "answer is L" beats "(L)", which beats "L." or "L)".
_MCQ_CANDIDATES = (
    (re.compile(rf"\b(?:answer|option|choice)\s*(?:is|:)\s*[(\[{{]?\s*([{MCQ_LETTERS}])\b", re.IGNORECASE), 10),
    (re.compile(rf"\(([{MCQ_LETTERS}])\)"), 8),
    (re.compile(rf"(?<![A-Za-z])([{MCQ_LETTERS}])[.)]"), 6),
)


def mcq_letter(ground_truth: str) -> str | None:
    """The option letter if the (simple-parsed) ground truth is a multiple-choice answer, else None."""
    if _MCQ_PLAIN_GT.fullmatch(ground_truth):
        return ground_truth
    match = _MCQ_BRACKETED_GT.fullmatch(ground_truth) or _MCQ_DOTTED_GT.fullmatch(ground_truth)
    return match.group(1) if match else None


def parse_mcq(prediction: str) -> str | None:
    """The option letter a prediction chooses: a bare letter, else the highest-priority, then earliest, candidate."""
    bare = _BARE_LETTER.fullmatch(prediction)
    if bare:
        return bare.group(1).upper()
    candidates = [
        (-priority, match.start(), match.group(1).upper())
        for pattern, priority in _MCQ_CANDIDATES
        for match in pattern.finditer(prediction)
    ]
    return min(candidates)[2] if candidates else None


_UNITS = (
    # symbols and angles
    "°", "%", "‰", "°C", "°F", "degrees", "degree", "deg", "rad",
    # length, area, volume
    "mm", "cm", "m", "km", "nm", "μm", "in", "inch", "inches", "ft", "feet", "yd", "mi", "miles",
    "mm^2", "cm^2", "m^2", "km^2", "mm²", "cm²", "m²", "km²", "cm^3", "m^3", "cm³", "m³", "mL", "ml", "L",
    # mass, time, speed, money
    "mg", "g", "kg", "t", "lb", "lbs", "s", "sec", "seconds", "min", "mins", "minutes", "h", "hr", "hrs", "hours",
    "days", "weeks", "months", "years", "m/s", "km/h", "mph", "dollars", "yuan",
    # Chinese
    "元", "角", "分", "米", "厘米", "毫米", "千米", "公里", "平方米", "平方厘米", "立方米", "立方厘米", "克", "千克",
    "公斤", "吨", "秒", "分钟", "小时", "天", "年", "岁", "度", "个", "人", "次",
)  # fmt: skip
# A unit ends the value and follows a digit or whitespace, so the "s" of "yes" is not one.
_UNIT_SUFFIX = re.compile(
    r"(?P<stem>.*?)(?:(?<=\d)|\s+)(?P<unit>"
    + "|".join(re.escape(unit) for unit in sorted(_UNITS, key=len, reverse=True))
    + r")",
    re.DOTALL,
)
_NUMBER_ONLY = re.compile(_NUMBER)
_PUNCTUATION = str.maketrans("", "", string.punctuation + "，。、；：？！“”‘’（）《》〈〉【】「」『』〔〕…—～·")


def split_unit(text: str) -> tuple[str, str | None]:
    """`(stem, unit)` if `text` ends with a known unit, else `(text, None)`."""
    match = _UNIT_SUFFIX.fullmatch(text)
    return (match.group("stem"), match.group("unit")) if match else (text, None)


def _as_number(text: str) -> float | None:
    return float(text) if _NUMBER_ONLY.fullmatch(text) else None


def _loose(text: str) -> str:
    """Lower case, without punctuation (ASCII's includes markdown's `*`), whitespace collapsed."""
    text = text.lower().translate(_PUNCTUATION)
    return _WHITESPACE_RUN.sub(" ", text).strip()


def relaxed_match(prediction: str, ground_truth: str) -> bool:
    """Steps (i)–(v) of `_relax_exact_match` on simple-parsed strings (PRISM_SPEC §6.2)."""
    letter = mcq_letter(ground_truth)
    if letter is not None:
        return parse_mcq(prediction) == letter
    if prediction == ground_truth:
        return True
    pred_stem, pred_unit = split_unit(prediction)
    gt_stem, gt_unit = split_unit(ground_truth)
    pred_number, gt_number = _as_number(pred_stem), _as_number(gt_stem)
    if pred_number is not None and gt_number is not None:
        # Units are ignored here: "12 cm" equals "12 mm".
        if gt_number == 0:
            return pred_number == 0
        return abs(pred_number - gt_number) / abs(gt_number) < NUMERIC_REL_TOL
    if _loose(prediction) == _loose(ground_truth):
        return True
    return pred_unit == gt_unit and _loose(pred_stem) == _loose(gt_stem)


# --- step 2.3 and the judge ---


def _math_verify_variants(text: str) -> list[str]:
    # The reference tries the text, the text without delimiters and its normalised LaTeX. Its inputs are already
    # simple-parsed, so the variants differ only for doubly wrapped values such as `$\(x\)$`.
    variants = (text, strip_math_delimiters(text), normalize_latex(text))
    return list(dict.fromkeys(variant for variant in variants if variant))


def single_value_match(prediction: str, ground_truth: str, *, use_math_verify: bool) -> bool:
    """Step 2 on one raw value of each side."""
    prediction, ground_truth = simple_parse(prediction), simple_parse(ground_truth)
    pred_points, gt_points = coordinates(prediction), coordinates(ground_truth)
    if pred_points and gt_points:
        return _same_coordinates(pred_points, gt_points)
    if relaxed_match(prediction, ground_truth):
        return True
    if not use_math_verify:
        return False
    golds, predictions = _math_verify_variants(ground_truth), _math_verify_variants(prediction)
    return bool(golds and predictions) and math_equivalent(golds, predictions)


def mm_gad_accuracy(answer: str, ground_truth: str, equivalent_answers: Sequence[str] | None = None) -> float:
    """1.0 if `answer` matches `ground_truth` under the rules above, else 0.0.

    `equivalent_answers` is accepted for the judge registry's uniform signature; `mm_gad` ignores it, as the
    reference does.
    """
    pred_parts, gt_parts = split_multi_value(answer), split_multi_value(ground_truth)
    if len(pred_parts) > 1 or len(gt_parts) > 1:
        correct = len(pred_parts) == len(gt_parts) and all(
            single_value_match(pred, gt, use_math_verify=False) for pred, gt in zip(pred_parts, gt_parts, strict=True)
        )
    else:
        correct = single_value_match(answer, ground_truth, use_math_verify=True)
    return 1.0 if correct else 0.0
