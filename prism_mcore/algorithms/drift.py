"""The drift report's arithmetic: caption faithfulness (micro precision/recall/F1 of stated facts) and answer
accuracy split by whether the caption was right (perception errors vs reasoning failures).

Inputs are per-caption counts from a caption checker (`rewards.caption_check`): facts stated, stated facts that are
true, true facts of the reference. Micro averages (sums over captions, then one division) keep a caption that states
nothing from dividing by zero and weigh each fact once. A quantity with nothing to average over is NaN, which the
metrics file records as null and the report shows as `-`.
"""

from __future__ import annotations

import torch


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    return (numerator / denominator).item() if denominator > 0 else float("nan")


def perception_drift(
    stated: torch.Tensor, correct: torch.Tensor, true: torch.Tensor, accuracy: torch.Tensor
) -> dict[str, float]:
    """Caption precision, recall and F1 over all facts, the share of exact captions (every true fact stated and
    nothing false), and the mean answer accuracy among exact and among inexact captions.

    All arguments are `[n]`, one entry per checked sample: `stated`, `correct`, `true` fact counts and `accuracy` in
    [0, 1].
    """
    stated, correct, true, accuracy = (t.double() for t in (stated, correct, true, accuracy))
    precision = _ratio(correct.sum(), stated.sum())
    recall = _ratio(correct.sum(), true.sum())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else float("nan")
    exact = (correct == stated) & (correct == true)
    return {
        "caption_precision": precision,
        "caption_recall": recall,
        "caption_f1": f1,
        "caption_exact": exact.double().mean().item() if len(exact) else float("nan"),
        "accuracy_caption_right": _ratio(accuracy[exact].sum(), exact.sum()),
        "accuracy_caption_wrong": _ratio(accuracy[~exact].sum(), (~exact).sum()),
    }
