"""The rule-based verifiable reward and the registry of accuracy judges (PRISM_SPEC §6.1).

For a response decoded with `skip_special_tokens=True`:
- a response that fails the format rule (§1) gets score 0, accuracy 0, format 0;
- the answer is the first `<answer>…</answer>` content, stripped; an empty one or one of 1024 characters or more gets
  score 0.2, accuracy 0, format 1;
- otherwise the data source's judge decides the accuracy, and score = 0.8·accuracy + 0.2·format.

Judges are looked up by `data_source`: `mm_gad` (the rule judge of §6.2, also used by the embedded synthetic task),
`math-77k` / `visual_logic-26k` (`math_verify_with_format`, §6.3) and `hiyouga/geometry3k`, the released recipes'
validation set. `register_judge` adds one.

geo3k is scored as the reference scores it, with its own rule (`geometry3k.py`): no format gate, score =
0.9·accuracy + 0.1·format, where format is the loose in-order tag check and accuracy is mathruler's `grade_answer`
(re-implemented without `eval`) on the first `<answer>` content. `reward_batch` scores the samples of a rollout batch
in place, on the calling thread or on a small thread pool.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prism_mcore.record import Sample
from prism_mcore.rewards import geometry3k
from prism_mcore.rewards.math_verify_judge import math_verify_accuracy
from prism_mcore.rewards.mm_gad_judge import mm_gad_accuracy
from prism_mcore.rewards.response_format import match_response_format

ACCURACY_WEIGHT = 0.8
FORMAT_WEIGHT = 0.2
MAX_ANSWER_CHARS = 1024  # answers this long or longer are not judged
DEFAULT_DATA_SOURCE = "mm_gad"

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# (answer, ground_truth, equivalent_answers) -> accuracy in [0, 1]
AccuracyJudge = Callable[[str, str, Sequence[str] | None], float]

_JUDGES: dict[str, AccuracyJudge] = {
    "mm_gad": mm_gad_accuracy,
    "math-77k": math_verify_accuracy,
    "visual_logic-26k": math_verify_accuracy,
    "hiyouga/geometry3k": geometry3k.geometry3k_accuracy,
}


@dataclass(frozen=True)
class RewardResult:
    """A verifiable reward and its two parts; `format` is the format reward, 1.0 for a valid response."""

    score: float
    accuracy: float
    format: float


def _geometry3k_reward(response_text: str, ground_truth: str) -> RewardResult:
    accuracy = geometry3k.geometry3k_accuracy(extract_answer(response_text) or "", ground_truth)
    format_reward = 1.0 if geometry3k.loose_format(response_text) else 0.0
    score = geometry3k.ACCURACY_WEIGHT * accuracy + geometry3k.FORMAT_WEIGHT * format_reward
    return RewardResult(score=score, accuracy=accuracy, format=format_reward)


# Sources the reference scores with a rule of their own instead of the format gate and 0.8/0.2.
_OWN_RULES: dict[str, Callable[[str, str], RewardResult]] = {"hiyouga/geometry3k": _geometry3k_reward}


def register_judge(data_source: str, judge: AccuracyJudge) -> None:
    """Make `judge` decide the accuracy of samples from `data_source`."""
    if data_source in _JUDGES:
        raise ValueError(f"data_source {data_source!r} already has a judge: {_JUDGES[data_source].__name__}")
    _JUDGES[data_source] = judge


def get_judge(data_source: str) -> AccuracyJudge:
    """The accuracy judge registered for `data_source`."""
    try:
        return _JUDGES[data_source]
    except KeyError:
        raise ValueError(
            f"no reward judge for data_source {data_source!r}; registered: {', '.join(sorted(_JUDGES))}"
        ) from None


def extract_answer(response_text: str) -> str | None:
    """The stripped content of the first `<answer>…</answer>`, or None if there is none."""
    match = _ANSWER.search(response_text)
    return match.group(1).strip() if match else None


def verifiable_reward(
    response_text: str,
    ground_truth: str,
    equivalent_answers: Sequence[str] | None = None,
    data_source: str = DEFAULT_DATA_SOURCE,
) -> RewardResult:
    """The rule-based reward of one response (see the module docstring)."""
    judge = get_judge(data_source)
    if data_source in _OWN_RULES:
        return _OWN_RULES[data_source](response_text, ground_truth)
    if match_response_format(response_text) is None:
        return RewardResult(score=0.0, accuracy=0.0, format=0.0)
    answer = extract_answer(response_text)
    accuracy = 0.0
    if answer and len(answer) < MAX_ANSWER_CHARS:
        accuracy = judge(answer, ground_truth, equivalent_answers)
    return RewardResult(score=ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * 1.0, accuracy=accuracy, format=1.0)


def _sample_reward(sample: Sample) -> RewardResult:
    # The segmenter also rejects responses holding vision tokens, which their text cannot show (geo3k's own rule
    # reads the text only, as the reference's).
    if not sample.format_valid and (sample.data_source or DEFAULT_DATA_SOURCE) not in _OWN_RULES:
        return RewardResult(score=0.0, accuracy=0.0, format=0.0)
    return verifiable_reward(
        sample.response_text, sample.ground_truth, sample.equivalent_answers, sample.data_source or DEFAULT_DATA_SOURCE
    )


def reward_batch(samples: Sequence[Sample], num_workers: int = 1) -> None:
    """Fill `reward`, `accuracy` and `format_reward` of segmented samples (see `ResponseSegmenter`).

    A sample without a `data_source` is judged by `DEFAULT_DATA_SOURCE`. With `num_workers > 1` the samples are scored
    on that many threads; their math-verify work then runs in as many helper processes, in parallel.
    """
    for sample in samples:
        if sample.segments is None:
            raise ValueError(f"sample {sample.uid!r} has no segments: run ResponseSegmenter.segment_samples first")
        if sample.ground_truth is None:
            raise ValueError(f"sample {sample.uid!r} has no ground_truth, so it cannot get a verifiable reward")
        try:
            get_judge(sample.data_source or DEFAULT_DATA_SOURCE)
        except ValueError as error:
            raise ValueError(f"sample {sample.uid!r}: {error}") from None
    if num_workers > 1:
        with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="reward") as pool:
            results = list(pool.map(_sample_reward, samples))
    else:
        results = [_sample_reward(sample) for sample in samples]
    for sample, result in zip(samples, results, strict=True):
        sample.reward, sample.accuracy, sample.format_reward = result.score, result.accuracy, result.format
