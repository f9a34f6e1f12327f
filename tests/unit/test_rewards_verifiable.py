"""Tests for prism_mcore.rewards.verifiable: the reward rule, the examples table and the judge registry (PRISM_SPEC §6).

Expected scores are 0.8·accuracy + 0.2·format: 1.0 for a right answer, 0.2 for a wrong one in a valid response,
0.0 for an invalid response.
"""

from __future__ import annotations

from typing import Any

import pytest

from prism_mcore.record import Sample, SegmentBounds
from prism_mcore.rewards import verifiable
from prism_mcore.rewards.verifiable import (
    RewardResult,
    extract_answer,
    get_judge,
    register_judge,
    reward_batch,
    verifiable_reward,
)

RIGHT = RewardResult(score=1.0, accuracy=1.0, format=1.0)
WRONG = RewardResult(score=0.2, accuracy=0.0, format=1.0)
INVALID = RewardResult(score=0.0, accuracy=0.0, format=0.0)


def respond(answer: str) -> str:
    return f"<caption>\n- a chart\n</caption>\n<think>\nRead the chart.\n</think>\n<answer>\n{answer}\n</answer>"


# PRISM_SPEC §6.4: (prediction, ground truth, mm_gad score, math_verify_with_format score where the spec notes it)
EXAMPLES = [
    ("(B)", "B", 1.0, None),
    ("The answer is (C)", "C", 1.0, 0.2),
    ("Option: d", "D", 1.0, None),
    ("B. 45°", "(B) 45°", 1.0, None),
    ("(A) or (C)", "C", 0.2, None),  # the earliest candidate, A, wins
    ("A", "A. twelve", 0.2, None),  # the ground truth is no MCQ: a letter follows "A. "
    ("3.0", "3", 1.0, None),
    ("12 cm", "12 mm", 1.0, None),  # units are ignored numerically
    ("1,000", "1000", 0.2, 1.0),  # mm_gad splits at the comma into two parts
    ("(2, 3)", "(2,3)", 0.2, None),  # the ground truth becomes (23)
    ("\\dfrac{1}{2}", "\\frac{1}{2}", 1.0, None),
    ("0.5", "\\frac{1}{2}", 1.0, None),  # by math-verify
    ("50%", "0.5", 1.0, None),  # by math-verify
    ("2\\sqrt{2}", "\\sqrt{8}", 0.2, None),
    ("(1) 3 (2) 4", "3; 4", 1.0, None),
    ("3, 4", "4, 3", 0.2, 1.0),  # mm_gad is order-sensitive
    ("**Yes**", "Yes.", 1.0, None),
    ("x=2", "2", 1.0, None),
    ("", "7", 0.2, 0.2),  # empty <answer></answer>
]


def expected_result(score: float) -> RewardResult:
    return RIGHT if score == 1.0 else WRONG


@pytest.mark.parametrize(("prediction", "ground_truth", "score", "_"), EXAMPLES)
def test_mm_gad_examples(prediction: str, ground_truth: str, score: float, _: float | None) -> None:
    assert verifiable_reward(respond(prediction), ground_truth) == expected_result(score)


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "score"),
    [(prediction, ground_truth, score) for prediction, ground_truth, _, score in EXAMPLES if score is not None],
)
@pytest.mark.parametrize("data_source", ["math-77k", "visual_logic-26k"])
def test_math_verify_with_format_differences(
    prediction: str, ground_truth: str, score: float, data_source: str
) -> None:
    assert verifiable_reward(respond(prediction), ground_truth, data_source=data_source) == expected_result(score)


@pytest.mark.parametrize("data_source", ["mm_gad", "math-77k"])
def test_text_before_caption_scores_zero(data_source: str) -> None:
    assert verifiable_reward("Sure. " + respond("3"), "3", data_source=data_source) == INVALID


def test_answer_length_limit() -> None:
    assert verifiable_reward(respond("7" * 1023), "7" * 1023) == RIGHT
    assert verifiable_reward(respond("7" * 1024), "7" * 1024) == WRONG


def test_extract_answer_takes_the_first_stripped_answer() -> None:
    assert extract_answer("<answer> 1 </answer> <answer>2</answer>") == "1"
    assert extract_answer("<answer>\n\n</answer>") == ""
    assert extract_answer("no answer") is None


def test_unknown_data_source_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="'geo3k'; registered: hiyouga/geometry3k, math-77k, mm_gad, visual_logic-26k"):
        verifiable_reward(respond("3"), "3", data_source="geo3k")


def test_register_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifiable, "_JUDGES", dict(verifiable._JUDGES))  # registrations end with the test

    def length_judge(answer: str, ground_truth: str, equivalent_answers: object) -> float:
        return 1.0 if len(answer) == int(ground_truth) else 0.0

    register_judge("test-lengths", length_judge)
    assert get_judge("test-lengths") is length_judge
    assert verifiable_reward(respond("abc"), "3", data_source="test-lengths") == RIGHT
    with pytest.raises(ValueError, match="already has a judge: length_judge"):
        register_judge("test-lengths", length_judge)


def segmented_sample(uid: str, text: str, ground_truth: str | None, format_valid: bool = True, **fields: Any) -> Sample:
    sample = Sample(uid=uid, prompt_ids=[1], ground_truth=ground_truth, response_text=text, **fields)
    sample.segments = SegmentBounds(caption_end=4, valid_length=9, format_valid=format_valid)
    return sample


def batch() -> list[Sample]:
    return [
        segmented_sample("right", respond("\\frac{1}{2}"), "0.5"),
        segmented_sample("wrong", respond("3, 4"), "4, 3"),
        segmented_sample("math", respond("3, 4"), "4, 3", data_source="math-77k"),
        segmented_sample("equivalent", respond("0.5"), "1/3", data_source="math-77k", equivalent_answers=["1/2"]),
        # the text is valid, but the segmenter found vision tokens in the response
        segmented_sample("vision_tokens", respond("3"), "3", format_valid=False),
        segmented_sample("invalid", "3", "3", format_valid=False),
    ]


EXPECTED_BATCH = [(1.0, 1.0, 1.0), (0.2, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)]


@pytest.mark.parametrize("num_workers", [1, 3])
def test_reward_batch(num_workers: int) -> None:
    samples = batch()
    reward_batch(samples, num_workers=num_workers)
    assert [(s.reward, s.accuracy, s.format_reward) for s in samples] == EXPECTED_BATCH


def test_reward_batch_rejects_unsegmented_or_unlabelled_samples() -> None:
    unsegmented = Sample(uid="u1", prompt_ids=[1], ground_truth="3", response_text=respond("3"))
    with pytest.raises(ValueError, match="'u1' has no segments"):
        reward_batch([unsegmented])
    with pytest.raises(ValueError, match="'u2' has no ground_truth"):
        reward_batch([segmented_sample("u2", respond("3"), None)])
    with pytest.raises(ValueError, match="sample 'u3': no reward judge for data_source 'geo3k'"):
        reward_batch([segmented_sample("u3", respond("3"), "3", data_source="geo3k")])
