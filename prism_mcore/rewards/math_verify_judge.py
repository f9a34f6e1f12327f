"""The `math_verify_with_format` judge of the `math-77k` and `visual_logic-26k` data sources (PRISM_SPEC §6.3).

The answer is right when math-verify finds `\\boxed{answer}` equivalent to `\\boxed{ground_truth}` or to the boxed form
of any of the sample's `equivalent_answers`. Gold strings are extracted as LaTeX, then expression, then string;
predictions as expression, then LaTeX, then string (math-verify's `math_metric` configuration in the reference).
Unlike `mm_gad`, it compares sets, so `3, 4` equals `4, 3`, and `1,000` reads as one thousand.

A data set marks "no equivalent answers" with an `__EMPTY__` entry; any list holding it is ignored. Each gold is judged on its own: a gold that math-verify cannot parse only
removes itself (the reference's `math_metric` would raise for the whole list and score 0).
"""

from __future__ import annotations

from collections.abc import Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, StringExtractionConfig

from prism_mcore.rewards.math_verify_runner import math_equivalent

EMPTY_EQUIVALENTS_MARKER = "__EMPTY__"
GOLD_TARGETS = (LatexExtractionConfig(), ExprExtractionConfig(), StringExtractionConfig())
PREDICTION_TARGETS = (ExprExtractionConfig(), LatexExtractionConfig(), StringExtractionConfig())


def math_verify_accuracy(answer: str, ground_truth: str, equivalent_answers: Sequence[str] | None = None) -> float:
    """1.0 if math-verify finds the boxed answer equivalent to the boxed ground truth or an equivalent answer."""
    golds = [ground_truth]
    if equivalent_answers and EMPTY_EQUIVALENTS_MARKER not in equivalent_answers:
        golds.extend(equivalent_answers)
    correct = math_equivalent(
        [f"\\boxed{{{gold}}}" for gold in golds],
        [f"\\boxed{{{answer}}}"],
        gold_targets=GOLD_TARGETS,
        prediction_targets=PREDICTION_TARGETS,
    )
    return 1.0 if correct else 0.0
