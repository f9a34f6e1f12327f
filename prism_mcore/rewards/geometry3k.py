"""The `hiyouga/geometry3k` validation reward, as the reference scores it (PRISM_SPEC §6.1).

The reward (assembled in `verifiable.py`) is 0.9·accuracy + 0.1·format, where
- format is `loose_format`: `<caption>`, `</caption>`, `<think>`, `</think>`, `<answer>`, `</answer>` occur in this
  order, anything around and between them (the reference's `.*<caption>.*</caption>.*…` search, not the strict gate
  of §1, here found in linear time);
- accuracy is `geometry3k_accuracy`: `grade_answer(answer, ground_truth)` on the stripped content of the first
  `<answer>…</answer>` (the empty string when there is none), whatever the format.

`grade_answer` agrees with mathruler's `grade_answer` (the reference's grader, itself from PRM800K) on its
normalisations, re-implemented here from their documented behaviour:
1. the MATH normalisation of both sides (`mathd_normalize`): an enclosing `\\text{}` unwrapped, then line breaks,
   `\\!`, `\\left`/`\\right`, `^\\circ`, `\\$`, `%` and a units tail `\\text{ …}` removed, `tfrac`/`dfrac` → `frac`,
   `.5` → `0.5`, a short `k = ` prefix dropped, `\\sqrt3` → `\\sqrt{3}`, spaces removed, `\\frac12` → `\\frac{1}{2}`,
   `0.5` → `\\frac{1}{2}` and `a/b` of integers → `\\frac{a}{b}`; equal strings are right;
2. else the PRM800K normalisation (`prm800k_normalize`): words `or`/`and` → commas, `million` etc. → powers of ten,
   unit words removed, LaTeX turned into plain text as pylatexenc 2.10's `latex2text` does for the macros answers use
   (`\\frac{a}{b}` → `a/b` without brackets, `\\sqrt{x}` → `sqrt(x)`, `\\pi` → `pi`, `\\cdot`/`\\times` → `*`,
   unknown macros dropped), mixed numbers `7 3/4` → `7+3/4`, spaces and braces removed, lower case, integers
   canonical; equal strings are right;
3. else both are split into tuple elements when bracketed (same brackets required), and each pair must agree:
   fractions `a/b` as strings, integers only with integers, anything else when the difference of the two
   expressions simplifies to 0.

Decisions:
1. mathruler hands step 3's expressions to sympy's `parse_expr`, which calls `eval`. Here they are read by
   `_SafeExpression`, a small recursive-descent parser for the grammar `parse_expr` accepts on these strings
   (numbers, `+ - * / **`, brackets, implicit multiplication as in `2x`, `2(x+1)`, `xy`, the names `sqrt`, `pi`,
   `oo` and one-letter symbols) that builds the sympy expression from sympy's constructors; model output is never
   executed. Anything outside that grammar (`!`, functions other than `sqrt`, relations, lists) counts as not equal;
   so do integer powers whose result would exceed 2^20 bits, and expressions over 200 characters, which could stall
   sympy (mathruler's own guards, at most two unknown letters and no `^{`, `^(` or multi-digit powers, also apply).
2. Font macros (`\\mathbf{x}`) read as their content; pylatexenc writes styled Unicode letters, which mathruler then
   never finds equal to plain ones.
3. Everything else follows mathruler, its quirks included: `\\frac{1}{2+3}` reads `1/2+3`, `\\right` is deleted
   from `\\rightarrow` in step 1, and a fraction is right only if written the same way (`2/4` is not `1/2`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import sympy

ACCURACY_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1
MAX_EXPRESSION_CHARS = 200
MAX_POWER_BITS = 1 << 20

_LOOSE_TAGS = ("<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>")


def loose_format(text: str) -> bool:
    """Whether the six response tags occur in order (each after the end of the previous one)."""
    position = 0
    for tag in _LOOSE_TAGS:
        found = text.find(tag, position)
        if found < 0:
            return False
        position = found + len(tag)
    return True


def geometry3k_accuracy(answer: str, ground_truth: str, equivalent_answers: Sequence[str] | None = None) -> float:
    """1.0 if `grade_answer` finds `answer` right, else 0.0 (`equivalent_answers` is ignored, as in the reference)."""
    return 1.0 if grade_answer(answer, ground_truth) else 0.0


# --- step 1: the MATH normalisation ---

_ENCLOSING_TEXT = re.compile(r"^\\text\{(?P<text>.+?)\}$")


class _Unchanged(Exception):
    """A normalisation step that cannot apply: the answer is compared as it was (MATH's behaviour)."""


def _fix_sqrt(text: str) -> str:
    pieces = text.split("\\sqrt")
    fixed = pieces[0]
    for piece in pieces[1:]:
        if not piece:
            raise _Unchanged
        fixed += "\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:])
    return fixed


def _fix_fracs(text: str) -> str:
    pieces = text.split("\\frac")
    fixed = pieces[0]
    for piece in pieces[1:]:
        fixed += "\\frac"
        if not piece:
            raise _Unchanged
        if piece[0] == "{":
            fixed += piece
        elif len(piece) < 2:
            return text
        elif piece[1] != "{":
            fixed += "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
        else:
            fixed += "{" + piece[0] + "}" + piece[1:]
    return fixed


def _fix_a_slash_b(text: str) -> str:
    pieces = text.split("/")
    if len(pieces) != 2:
        return text
    try:
        numerator, denominator = int(pieces[0]), int(pieces[1])
    except ValueError:
        return text
    return f"\\frac{{{numerator}}}{{{denominator}}}" if text == f"{numerator}/{denominator}" else text


def mathd_normalize(answer: str) -> str:
    """Step 1's canonical form of an answer (the MATH data set's `normalize_answer`)."""
    answer = answer.strip()
    match = _ENCLOSING_TEXT.search(answer)
    if match:
        answer = match.group("text").strip()
    text = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in text:  # a units tail: the MATH data writes units as `\text{ cm}`
        pieces = text.split("\\text{ ")
        if len(pieces) != 2:
            return answer
        text = pieces[0]
    text = text.replace("\\%", "").replace("%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    try:
        text = _fix_sqrt(text) if "\\sqrt" in text else text
        text = _fix_fracs(text.replace(" ", ""))
    except _Unchanged:
        return answer
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _fix_a_slash_b(text)


# --- step 2: the PRM800K normalisation ---

_UNIT_WORDS = (
    "degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week", "month", "year",
    "foot", "feet", "inch", "yard",
)  # fmt: skip
_UNIT_WORD_PATTERNS = [re.compile(rf"{word}(es)?(s)? *(\^[0-9]+)?") for word in _UNIT_WORDS]
_DEGREE_SIGN = re.compile(r"\^ *\\circ")
_THIN_SPACE_COMMA = re.compile(r",\\! *")
_NEGATIVE_SIGN = re.compile(r"- *")
_MIXED_NUMBER = re.compile(r"([0-9]) +([0-9])")
_FORMATTED_COMMA = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
_TEXT_SYMBOLS = {"√": "sqrt", "π": "pi", "∞": "inf", "∪": "U", "·": "*", "×": "*"}


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _is_integral(number: float) -> bool:
    return math.isfinite(number) and abs(number - round(number)) <= 1e-7


def _strip_formatted_commas(text: str) -> str:
    """`1,234,567` → `1234567`, leaving tuple commas such as `(1,2)` alone."""
    while True:
        stripped = _FORMATTED_COMMA.sub(r"\1\3\4", text)
        if stripped == text:
            return text
        text = stripped


def _integer_text(text: str) -> str | None:
    """The integer `text` reads as (formatted commas allowed; truncated, as PRM800K's `int(float(x))`), else None."""
    number = _float_or_none(_strip_formatted_commas(text))
    return str(int(number)) if number is not None and _is_integral(number) else None


def prm800k_normalize(expression: str) -> str:
    """Step 2's canonical form of an answer (PRM800K's `_normalize`)."""
    match = _ENCLOSING_TEXT.search(expression)
    if match:
        expression = match.group("text")
    expression = expression.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expression = expression.replace(" or ", " , ").replace(" and ", " , ")
    for word, power in (("million", 6), ("billion", 9), ("trillion", 12)):
        expression = expression.replace(word, f"*10^{power}")
    for pattern in _UNIT_WORD_PATTERNS:
        expression = pattern.sub("", expression)
    expression = _DEGREE_SIGN.sub("", expression)
    if expression[:1] == "{" and expression[-1:] == "}":
        expression = expression[1:-1]
    expression = _THIN_SPACE_COMMA.sub("", expression)
    number = _float_or_none(expression)
    if number is not None and _is_integral(number):
        expression = str(round(number))
    if "\\" in expression:
        expression = latex_to_text(expression)
    expression = _MIXED_NUMBER.sub(r"\1+\2", _NEGATIVE_SIGN.sub("-", expression))
    expression = expression.replace(" ", "").replace("{", "").replace("}", "").lower()
    integer = _integer_text(expression)
    return expression if integer is None else integer


# --- LaTeX to plain text, as pylatexenc 2.10's latex2text does for the macros answers use ---

_GREEK_LETTERS = dict(
    zip(
        "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi pi varpi rho "
        "varrho sigma varsigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi "
        "Psi Omega".split(),
        "αβγδϵεζηθϑικλμνξπϖρϱσςτυϕφχψωΓΔΘΛΞΠΣΥΦΨΩ",
        strict=True,
    )
)
_SYMBOL_MACROS = {
    **_GREEK_LETTERS,
    "infty": "∞", "cdot": "·", "times": "×", "cup": "∪", "cap": "∩", "circ": "∘", "angle": "∠", "pm": "±",
    "mp": "∓", "le": "≤", "leq": "≤", "ge": "≥", "geq": "≥", "neq": "≠", "ne": "≠", "approx": "≈", "perp": "⊥",
    "parallel": "∥", "div": "÷", "ldots": "…", "cdots": "⋯", "dots": "…", "degree": "°",
    "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc", "log": "log", "ln": "ln",
    "exp": "exp", "min": "min", "max": "max",
    ",": " ", ";": " ", ":": " ", " ": " ", "!": "", "quad": "  ", "qquad": "    ", "\\": "\n",
    "%": "%", "$": "$", "{": "{", "}": "}", "_": "_", "&": "&", "#": "#",
}  # fmt: skip
_ONE_ARGUMENT_MACROS = {
    "text", "textrm", "textit", "textbf", "textsc", "textsl", "emph", "mathrm", "mathbf", "mathit", "mathsf",
    "mathbb", "mathtt", "mathcal", "overline", "underline", "widehat", "widetilde", "overrightarrow", "boxed",
}  # fmt: skip
_FRACTION_MACROS = {"frac", "nicefrac", "textfrac"}
_MACRO = re.compile(r"\\([A-Za-z]+|.)", re.DOTALL)


class _LatexReader:
    """Walks a LaTeX string once: groups become their content, known macros their text, unknown ones nothing."""

    def __init__(self, text: str) -> None:
        self.text, self.position = text, 0

    def read(self, until_brace: bool = False) -> str:
        out = []
        while self.position < len(self.text):
            if self.text[self.position] == "}" and until_brace:
                self.position += 1
                return "".join(out)
            out.append(self.node())
        return "".join(out)

    def node(self) -> str:
        char = self.text[self.position]
        if char == "{":
            self.position += 1
            return self.read(until_brace=True)
        if char != "\\":
            self.position += 1
            return char
        match = _MACRO.match(self.text, self.position)
        if match is None:  # a final lone backslash
            self.position += 1
            return ""
        self.position = match.end()
        name = match.group(1)
        if name.isalpha():  # LaTeX skips the spaces after a control word
            while self.position < len(self.text) and self.text[self.position].isspace():
                self.position += 1
        return self.macro(name)

    def argument(self) -> str:
        while self.position < len(self.text) and self.text[self.position].isspace():
            self.position += 1
        return self.node() if self.position < len(self.text) else ""

    def macro(self, name: str) -> str:
        if name in _FRACTION_MACROS:
            numerator = self.argument()
            return f"{numerator}/{self.argument()}"
        if name == "sqrt":
            if self.text.startswith("[", self.position):  # the root's degree is not written out
                close = self.text.find("]", self.position)
                self.position = len(self.text) if close < 0 else close + 1
            return f"√({self.argument()})"
        if name in _ONE_ARGUMENT_MACROS:
            return self.argument()
        return _SYMBOL_MACROS.get(name, "")


def latex_to_text(expression: str) -> str:
    """PRM800K's `_parse_latex`: a space before each `\\frac` (so mixed numbers stay apart), LaTeX to text, and the
    symbols sympy cannot read spelled out."""
    expression = expression.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    text = _LatexReader(expression.replace("\\frac", " \\frac")).read()
    for symbol, spelled in _TEXT_SYMBOLS.items():
        text = text.replace(symbol, spelled)
    return text.strip()


# --- step 3: tuples and equality of expressions ---

_TUPLE_BRACKETS = "()[]"
_FRACTION = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")
_BAD_POWERS = re.compile(r"\^[0-9]+\^|\^[0-9][0-9]+")


def split_tuple(expression: str) -> list[str]:
    """The elements of a bracketed tuple or interval (no brackets inside), else the expression alone."""
    expression = _strip_formatted_commas(expression)
    if not expression:
        return []
    inner = expression[1:-1]
    if (
        len(expression) > 2
        and expression[0] in _TUPLE_BRACKETS
        and expression[-1] in _TUPLE_BRACKETS
        and not any(bracket in inner for bracket in _TUPLE_BRACKETS)
    ):
        return [element.strip() for element in inner.split(",")]
    return [expression]


def _may_evaluate(expression: str) -> bool:
    """mathruler's guards: at most two unknown letters, no `^{`, `^(`, stacked or multi-digit powers."""
    letters = {char for char in expression.replace("sqrt", "").replace("frac", "") if char.isalpha()}
    return (
        len(letters) <= 2
        and "^{" not in expression
        and "^(" not in expression
        and not _BAD_POWERS.search(expression)
        and len(expression) <= MAX_EXPRESSION_CHARS
    )


class _NotReadable(Exception):
    """The string is outside the grammar `_SafeExpression` reads."""


# sympy functions whose names pass mathruler's two-letter guard: parse_expr would apply them; here they are refused
_SYMPY_FUNCTIONS = {"ln", "re", "im", "li", "ff", "rf", "jn", "yn"}
_TOKEN = re.compile(r"\s*(?:(?P<number>(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)|(?P<name>[^\W\d]\w*)|(?P<op>\*\*|[-+*/()]))")


class _SafeExpression:
    """Reads an arithmetic expression into sympy without `eval` (Decision 1).

    Grammar, with Python's precedence (`**` binds tighter than a unary sign on its left and is right-associative):
    sum := product (('+'|'-') product)*; product := unary (('*'|'/') unary | implicit factor)*;
    unary := ('+'|'-') unary | power; power := atom ('**' unary)?; atom := number | name | '(' sum ')' | 'sqrt' atom.
    A name is `pi`, `oo`, `sqrt`, or is read letter by letter (`xy` is x·y, `x2` is 2x, as sympy's split_symbols).
    """

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        position = 0
        text = text.strip()
        while position < len(text):
            match = _TOKEN.match(text, position)
            if match is None or match.end() == position:
                raise _NotReadable(text)
            position = match.end()
            kind = match.lastgroup
            if kind == "name":
                self.tokens.extend(self._split_name(match.group(kind)))
            else:
                self.tokens.append((kind, match.group(kind)))
        self.index = 0

    @staticmethod
    def _split_name(name: str) -> list[tuple[str, str]]:
        if name in ("pi", "oo", "sqrt"):
            return [("name", name)]
        if name in _SYMPY_FUNCTIONS:
            raise _NotReadable(f"function {name}")
        pieces = re.findall(r"\d+|\D", name)
        return [("number", piece) if piece.isdigit() else ("name", piece) for piece in pieces]

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            raise _NotReadable(f"expected {value!r}")
        self.index += 1
        return token

    def parse(self) -> sympy.Expr:
        expression = self.sum()
        if self.peek() is not None:
            raise _NotReadable("trailing tokens")
        return expression

    def sum(self) -> sympy.Expr:
        value = self.product()
        while self.peek() in (("op", "+"), ("op", "-")):
            sign = self.take()[1]
            value = value + self.product() if sign == "+" else value - self.product()
        return value

    def _starts_factor(self) -> bool:
        token = self.peek()
        return token is not None and (token[0] in ("number", "name") or token == ("op", "("))

    def product(self) -> sympy.Expr:
        value = self.unary()
        while True:
            if self.peek() in (("op", "*"), ("op", "/")):
                operator = self.take()[1]
                right = self.unary()
                value = value * right if operator == "*" else value / right
            elif self._starts_factor():  # implicit multiplication: 2x, 2(x+1), (a)(b)
                value = value * self.power()
            else:
                return value

    def unary(self) -> sympy.Expr:
        if self.peek() in (("op", "+"), ("op", "-")):
            sign = self.take()[1]
            operand = self.unary()
            return operand if sign == "+" else -operand
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.atom()
        if self.peek() != ("op", "**"):
            return base
        self.take()
        exponent = self.unary()
        if base.is_Rational and exponent.is_Integer and base not in (0, 1, -1):
            size = max(abs(base.p).bit_length(), abs(base.q).bit_length())
            if size * abs(int(exponent)) > MAX_POWER_BITS:
                raise _NotReadable("power too large")
        return base**exponent

    def atom(self) -> sympy.Expr:
        kind, value = self.take()
        if kind == "number":
            return sympy.Integer(value) if value.isdigit() else sympy.Float(value)
        if kind == "name":
            if value == "pi":
                return sympy.pi
            if value == "oo":
                return sympy.oo
            if value == "sqrt":
                return sympy.sqrt(self.atom())
            return sympy.Symbol(value)
        if value == "(":
            inner = self.sum()
            self.take(")")
            return inner
        raise _NotReadable(f"unexpected {value!r}")


def equal_under_sympy(ground_truth: str, given: str) -> bool:
    """Whether `(ground_truth) - (given)` simplifies to 0, read without `eval` (False when it cannot be read)."""
    expression = f"({ground_truth})-({given})"
    if not _may_evaluate(expression):
        return False
    try:
        difference = _SafeExpression(expression.replace("^", "**")).parse()
        return bool(sympy.simplify(difference) == 0)
    except Exception:  # unreadable here, or any of sympy's many errors on odd input: not equal, as in mathruler
        return False


def _elements_equal(ground_truth: str, given: str) -> bool:
    if _FRACTION.search(ground_truth) and _FRACTION.search(given):
        return ground_truth == given  # an unreduced fraction is not the reduced one
    if (_integer_text(ground_truth) is None) != (_integer_text(given) is None):
        return False  # an integer answer needs an integer
    return equal_under_sympy(ground_truth, given)


def grade_answer(given: str, ground_truth: str) -> bool:
    """Whether `given` is right for `ground_truth`, as mathruler's `grade_answer` decides (module docstring)."""
    if mathd_normalize(ground_truth) == mathd_normalize(given):
        return True
    ground_truth, given = prm800k_normalize(ground_truth), prm800k_normalize(given)
    if ground_truth == given:
        return True
    if not given:
        return False
    truth_elements, given_elements = split_tuple(ground_truth), split_tuple(given)
    if len(truth_elements) > 1 and (ground_truth[0] != given[0] or ground_truth[-1] != given[-1]):
        return False
    if len(truth_elements) != len(given_elements):
        return False
    return all(_elements_equal(truth, answer) for truth, answer in zip(truth_elements, given_elements, strict=True))
