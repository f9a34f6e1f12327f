"""The `mm_gad` rule judge: is an extracted answer right? (PRISM_SPEC §6.2)

`mm_gad_accuracy(answer, ground_truth)` is 1.0 or 0.0:
1. Both raw strings are split into parts (`split_multi_value`). If either has more than one part, the counts must
   match and every aligned pair must pass the whole single-value judge of step 2, math-verify included (order
   matters).
2. A single value (`single_value_match`) is compared after `simple_parse`: first as coordinate lists, then by
   `relaxed_match` (multiple choice, exact, numeric, loose text, loose text without units), and last by math-verify
   over the variants of both strings (only when neither parsed string splits into parts).

It follows the reference's rules, its quirks included (`1,000` is two parts; `(2,3)` reads `(23)`; units are ignored
when both sides are numbers, so `12 cm` equals `12 mm`; a bare lower-case letter is a value, not an option label).

Decisions (where we deliberately differ from the reference, which is clearly wrong there):
1. Coordinates: a number may start with its decimal point (`.5`) or carry an exponent (`1e-3`). The reference's
   pattern reads `(.5, 2)` as `(5, 2)` and `(1e-3, 2)` as `(3, 2)`.
2. `\\left` and `\\right` are dropped only as whole commands: `\\rightarrow`, `\\leftarrow`, `\\leftrightarrow`
   survive. The reference deletes the prefix, so `\\rightarrow` becomes `arrow` and equals `\\leftarrow`.
3. Step (iv) keeps a `.` that is followed by a digit (a decimal point): `x=1.5` is not `x=15`. The reference deletes
   every `.`.
4. Step (iii) reads only finite numbers. The reference hands `nan`/`inf` to float arithmetic, where NaN != NaN and
   inf - inf is NaN, so `NaN` vs `nan` (or `inf` vs `Infinity`) scores 0 without reaching the text comparisons.
5. Lettered sub-answers `(a) … (b) …` (labels a, b, c… in order, at least two, the first within the first three
   characters) are split like numbered ones and judged part by part. The reference reads `(a) 4 (b) 3` as option A,
   so any answer starting with `(a)` matched it.
6. math-verify's verdict counts only when it read each side whole (`reads_whole`): around the number or expression it
   extracted only a leading option label, a leading `name =` and a trailing `%`, degree sign or unit may remain. On bare text math-verify extracts one number out of anything, so the reference scores `3 or 4`
   right against `4`, `2x^7` against `2x^5`, `2\\sqrt{2}` against `2` and `2` against `2x-4`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from prism_mcore.rewards.math_verify_runner import math_equivalent

MCQ_LETTERS = "ABCDEFGH"
NUMERIC_REL_TOL = 1e-6
COORDINATE_ABS_TOL = 1e-6

# --- step 1: multi-value split ---

_NUMBERED_MARKER = re.compile(r"\(\d+\)\s*")
_LETTERED_MARKER = re.compile(r"\(([a-hA-H])\)\s*")
_SEMICOLON = re.compile(r"\s*[;；]\s*")
_OPENING, _CLOSING = "([{", ")]}"
_PART_TRAILERS = ",;，；"


def _marker_parts(text: str, markers: list[re.Match]) -> list[str]:
    """The non-empty texts between consecutive markers (and after the last), when they start the text."""
    if len(markers) < 2 or markers[0].start() > 2:
        return []
    ends = [marker.start() for marker in markers[1:]] + [len(text)]
    parts = [text[marker.end() : end].strip().rstrip(_PART_TRAILERS) for marker, end in zip(markers, ends, strict=True)]
    return [part for part in parts if part]


def _lettered_markers(text: str) -> list[re.Match]:
    """`(a)`, `(b)`, … markers when every lettered marker of the text is next in one run from a (or A)."""
    markers = list(_LETTERED_MARKER.finditer(text))
    if not markers:
        return []
    first = "a" if markers[0].group(1).islower() else "A"
    expected = [chr(ord(first) + i) for i in range(len(markers))]
    return markers if [marker.group(1) for marker in markers] == expected else []


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
    return [part.strip() for part in parts if part.strip()]


def split_multi_value(text: str) -> list[str]:
    """The parts of a possibly multi-valued answer; `[text]` (stripped) when it has one part.

    The first rule giving at least two non-empty parts wins: numbered markers `(1) … (2) …`, then lettered ones
    `(a) … (b) …` (Decision 5), each needing at least two markers with the first within the first three characters;
    then semicolons (ASCII or full-width); then commas outside brackets.
    """
    text = text.strip()
    for markers in (list(_NUMBERED_MARKER.finditer(text)), _lettered_markers(text)):
        parts = _marker_parts(text, markers)
        if len(parts) >= 2:
            return parts
    for parts in ([part for part in _SEMICOLON.split(text) if part.strip()], _top_level_comma_split(text)):
        if len(parts) >= 2:
            return [part.strip() for part in parts]
    return [text]


# --- step 2: simple parse ---

_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_TEXT_WRAPPER = re.compile(r"\\text\s*\{([^}]*)\}")
_MATHRM_WRAPPER = re.compile(r"\\mathrm\s*\{([^}]*)\}")
_SIZED_DELIMITER = re.compile(r"\\(?:left|right)(?![A-Za-z])\s*")  # Decision 2
_SPACE_AFTER_BRACE = re.compile(r"\{\s+")
_SPACE_BEFORE_BRACE = re.compile(r"\s+\}")
_WHITESPACE_RUN = re.compile(r"\s+")
_DIGIT_COMMA = re.compile(r"(\d),(\d)")  # non-overlapping, as the reference: "1,2,3" -> "12,3"


def strip_math_delimiters(text: str) -> str:
    """`text` stripped, then without an outer `$$…$$`, then `$…$`, then `\\(…\\)`, then `\\[…\\]` (each tried once,
    in that order, and only around something)."""
    text = text.strip()
    for opening, closing in _MATH_DELIMITERS:
        if len(text) > len(opening) + len(closing) and text.startswith(opening) and text.endswith(closing):
            text = text[len(opening) : len(text) - len(closing)].strip()
    return text


def normalize_latex(text: str) -> str:
    """`\\dfrac`/`\\tfrac` → `\\frac`, `\\text{…}`/`\\mathrm{…}` unwrapped (a space may precede the brace; the content
    ends at the first `}`), `\\left`/`\\right` dropped with the spaces after them, no spaces just inside braces,
    whitespace runs collapsed to one space."""
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _MATHRM_WRAPPER.sub(r"\1", _TEXT_WRAPPER.sub(r"\1", text))
    text = _SIZED_DELIMITER.sub("", text)
    text = _SPACE_BEFORE_BRACE.sub("}", _SPACE_AFTER_BRACE.sub("{", text))
    return _WHITESPACE_RUN.sub(" ", text).strip()


def _without_digit_commas(text: str) -> str:
    return _DIGIT_COMMA.sub(r"\1\2", text).replace("，", "")


def simple_parse(text: str) -> str:
    """The canonical form of one value: delimiters stripped, LaTeX normalised, digit-group commas and full-width
    commas removed, one trailing period removed."""
    text = _without_digit_commas(normalize_latex(strip_math_delimiters(text)))
    return text.removesuffix(".").strip()


# --- step 2.1: coordinates ---

_NUMBER = r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"  # Decision 1
_COORDINATE = re.compile(rf"\(?\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)?")


def coordinates(text: str) -> list[tuple[float, float]]:
    """All `x, y` number pairs in `text`, in order; the parentheses around a pair are optional, as in the reference."""
    return [(float(x), float(y)) for x, y in _COORDINATE.findall(text)]


def _same_coordinates(pred: list[tuple[float, float]], gt: list[tuple[float, float]]) -> bool:
    return len(pred) == len(gt) and all(
        math.isclose(p, g, rel_tol=0.0, abs_tol=COORDINATE_ABS_TOL)
        for pred_point, gt_point in zip(pred, gt, strict=True)
        for p, g in zip(pred_point, gt_point, strict=True)
    )


# --- step 2.2: relaxed match ---

_L = f"[{MCQ_LETTERS}{MCQ_LETTERS.lower()}]"
_MCQ_BRACKETED_GT = re.compile(rf"\(({_L})\)\s+.+", re.DOTALL)
# A letter and a period start an option only when a bracket, digit or sign follows the space: "C. 3" and "B. 45°" are
# options, "A. twelve" a sentence.
_MCQ_DOTTED_GT = re.compile(rf"({_L})\.\s+(?=[(\[{{0-9+\-]).+", re.DOTALL)

_BARE_LETTER = re.compile(rf"\s*[(\[{{]?\s*({_L})\s*[)\]}}]?\s*[.:]?\s*")
_TOKEN_BEFORE, _TOKEN_AFTER = r"(?:^|[\s,;:])", r"(?=$|[\s,;:.!?])"  # a label stands alone: not `f(A)`, not `B.5`
# (pattern, priority): an explicit "answer is L" beats "(L)", which beats "L." or "L)".
_MCQ_CANDIDATES = (
    (
        re.compile(
            r"\b(?:the\s+)?(?:correct\s+)?(?:final\s+)?(?:answer|option|choice)\s*(?:is|:)\s*"
            rf"[(\[{{]?\s*({_L})\s*[)\]}}]?{_TOKEN_AFTER}",
            re.IGNORECASE,
        ),
        10,
    ),
    (re.compile(rf"{_TOKEN_BEFORE}\(({_L})\){_TOKEN_AFTER}"), 8),
    (re.compile(rf"{_TOKEN_BEFORE}({_L})[.)]{_TOKEN_AFTER}"), 6),
)


def mcq_letter(ground_truth: str) -> str | None:
    """The option letter (upper case) if the simple-parsed ground truth is a multiple-choice answer, else None.

    A bare label must be upper case (a lower-case letter is a value, e.g. a side `b`); a label in `(a) 5` or `a. 5`
    may be either case.
    """
    ground_truth = ground_truth.strip()
    if len(ground_truth) == 1 and ground_truth in MCQ_LETTERS:
        return ground_truth
    match = _MCQ_BRACKETED_GT.fullmatch(ground_truth) or _MCQ_DOTTED_GT.fullmatch(ground_truth)
    return match.group(1).upper() if match else None


def parse_mcq(prediction: str) -> str | None:
    """The option letter a prediction chooses: a bare letter, else the highest-priority, then earliest, candidate."""
    prediction = prediction.strip()
    bare = _BARE_LETTER.fullmatch(prediction)
    if bare:
        return bare.group(1).upper()
    candidates = [
        (-priority, match.start(), match.group(1).upper())
        for pattern, priority in _MCQ_CANDIDATES
        for match in pattern.finditer(prediction)
    ]
    return min(candidates)[2] if candidates else None


# The reference's unit list, matched case-insensitively, only right after a digit (spaces allowed between).
_UNITS = (
    "°", "°C", "°F", "%", "meter", "meters", "cm", "mm", "km", "inch", "inches", "ft", "feet",
    "kg", "mg", "lb", "lbs", "pound", "pounds",
    "second", "seconds", "sec", "minute", "minutes", "min", "hour", "hours", "hr", "day", "days", "year", "years",
    "plate", "plates", "piece", "pieces", "item", "items", "people", "person", "persons", "student", "students",
    "time", "times", "dm", "ml", "mL", "liter", "liters", "litre", "litres", "cm²", "cm³", "m²", "m³",
    "元", "米", "厘米", "千克", "克", "度", "个", "条", "张", "块", "人", "次",
)  # fmt: skip
_TRAILING_UNIT = re.compile(
    r"(?<=\d)\s*(" + "|".join(re.escape(unit) for unit in sorted(set(_UNITS), key=len, reverse=True)) + r")\s*$",
    re.IGNORECASE,
)
_EMPHASIS = re.compile(r"\*{1,2}(.+?)\*{1,2}")
# Step (iv) deletes only these; a `.` before a digit is a decimal point and stays (Decision 3).
_LOOSE_DELETED = re.compile(r"[，。！？、；：“”‘’（）\[\]【】{}\",;:!?'()]|\.(?!\d)")


def split_unit(text: str) -> tuple[str, str | None]:
    """`(stem, unit)` if `text` ends with a known unit right after a digit (the unit lower-cased), else
    `(text, None)`."""
    match = _TRAILING_UNIT.search(text)
    if match is None:
        return text, None
    return text[: match.start()].strip(), match.group(1).lower()


def parse_number(text: str) -> float | None:
    """The finite number `text` reads as once digit-group commas and a trailing unit are removed, else None."""
    stem, _ = split_unit(_without_digit_commas(text.strip()))
    try:
        number = float(stem)
    except ValueError:
        return None
    return number if math.isfinite(number) else None  # Decision 4


def loose_text(text: str) -> str:
    """Step (iv)'s form: lower case, `*…*`/`**…**` unwrapped, the listed punctuation deleted, whitespace collapsed."""
    text = _EMPHASIS.sub(r"\1", text.lower().strip())
    return _WHITESPACE_RUN.sub(" ", _LOOSE_DELETED.sub("", text)).strip()


def relaxed_match(prediction: str, ground_truth: str) -> bool:
    """Steps (i)–(v) of `_relax_exact_match` on simple-parsed strings (PRISM_SPEC §6.2)."""
    letter = mcq_letter(ground_truth)
    if letter is not None:
        return parse_mcq(prediction) == letter
    if prediction.strip() == ground_truth.strip():
        return True
    pred_number, gt_number = parse_number(prediction), parse_number(ground_truth)
    if pred_number is not None and gt_number is not None:
        # Units are ignored here: "12 cm" equals "12 mm".
        if gt_number == 0:
            return pred_number == 0
        return abs(pred_number - gt_number) / abs(gt_number) < NUMERIC_REL_TOL
    if loose_text(prediction) == loose_text(ground_truth):
        return True
    (pred_stem, pred_unit), (gt_stem, gt_unit) = split_unit(prediction), split_unit(ground_truth)
    return bool(pred_stem and gt_stem) and loose_text(pred_stem) == loose_text(gt_stem) and pred_unit == gt_unit


# --- step 2.3 and the judge ---


def _math_verify_variants(text: str) -> list[str]:
    # The text, without its delimiters, and that LaTeX-normalised. The inputs are already simple-parsed, so the
    # variants differ only for doubly wrapped values such as `$\(x\)$`.
    stripped = strip_math_delimiters(text)
    return list(dict.fromkeys((text, stripped, normalize_latex(stripped))))


_DELIMITERS_AND_SPACE = re.compile(r"\\[()\[\]]|\$|\s+")
_BEFORE_VALUE = re.compile(rf"(?:\(?{_L}[.)]|\({_L}\))?(?:[A-Za-z]\w*=)?")  # `x=2` reads as 2, `C. 3` as 3
_AFTER_VALUE = re.compile(
    r"(?:%|\\%|\^\\circ|\^\{\\circ\}|"
    + "|".join(re.escape(unit) for unit in sorted(set(_UNITS), key=len, reverse=True))
    + r")?",
    re.IGNORECASE,
)


def reads_whole(text: str, extracted: str, is_gold: bool) -> bool:
    """Whether math-verify, reading `extracted` out of `text`, read the whole value (Decision 6); the same rule for
    ground truths and predictions (`is_gold` is part of the runner's check signature).

    Around the extracted string only a leading option label, a leading `name =` and a trailing percent or degree sign
    or unit may remain (spaces and math delimiters aside).
    """
    compact, value = _DELIMITERS_AND_SPACE.sub("", text), _DELIMITERS_AND_SPACE.sub("", extracted)
    start = compact.find(value)
    if not value or start < 0:
        return False
    return bool(_BEFORE_VALUE.fullmatch(compact[:start]) and _AFTER_VALUE.fullmatch(compact[start + len(value) :]))


def _math_verify_match(prediction: str, ground_truth: str) -> bool:
    if len(split_multi_value(prediction)) > 1 or len(split_multi_value(ground_truth)) > 1:
        return False
    return math_equivalent(_math_verify_variants(ground_truth), _math_verify_variants(prediction), accept=reads_whole)


def single_value_match(prediction: str, ground_truth: str) -> bool:
    """Step 2 on one raw value of each side: coordinates, else relaxed match, else math-verify."""
    prediction, ground_truth = simple_parse(prediction), simple_parse(ground_truth)
    pred_points, gt_points = coordinates(prediction), coordinates(ground_truth)
    if pred_points and gt_points:
        return _same_coordinates(pred_points, gt_points)
    return relaxed_match(prediction, ground_truth) or _math_verify_match(prediction, ground_truth)


def mm_gad_accuracy(answer: str, ground_truth: str, equivalent_answers: Sequence[str] | None = None) -> float:
    """1.0 if `answer` matches `ground_truth` under the rules above, else 0.0.

    `equivalent_answers` is accepted for the judge registry's uniform signature; `mm_gad` ignores it, as the
    reference does.
    """
    pred_parts, gt_parts = split_multi_value(answer), split_multi_value(ground_truth)
    if len(pred_parts) > 1 or len(gt_parts) > 1:
        correct = len(pred_parts) == len(gt_parts) and all(
            single_value_match(pred, gt) for pred, gt in zip(pred_parts, gt_parts, strict=True)
        )
    else:
        correct = single_value_match(answer, ground_truth)
    return 1.0 if correct else 0.0
