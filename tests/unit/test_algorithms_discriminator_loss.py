"""Discriminator losses (alignment pairwise + fallback + regulariser, warmup, whole-response) by hand."""

from __future__ import annotations

import math

import pytest
import torch

from prism_mcore.algorithms import (
    DISCRIMINATOR_METRICS,
    discriminator_loss,
    pairwise_warmup_loss,
    sanitize_scores,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _scores():
    """Three samples; sample 2 is invalid. teacher caption 12 clips to 10, student CoT NaN becomes 0."""
    return {
        "student_caption": torch.tensor([1.0, 2.0, 0.5], requires_grad=True),
        "student_cot": torch.tensor([0.0, float("nan"), -1.0], requires_grad=True),
        "teacher_caption": torch.tensor([3.0, 1.0, 12.0], requires_grad=True),
        "teacher_cot": torch.tensor([1.0, 1.0, 2.0], requires_grad=True),
    }


VALID = torch.tensor([True, True, False])
# Regulariser over all three samples: capS^2 1.75, cotS^2 1/3, capT^2 110/3, cotT^2 2 -> mean 10.1875.
SCORE_REG = (1.75 + 1 / 3 + 110 / 3 + 2) / 4


def test_sanitize_scores_zeroes_non_finite_and_clips_with_zero_gradient():
    scores = torch.tensor([float("nan"), float("inf"), -12.0, 3.0], requires_grad=True)
    clean = sanitize_scores(scores, clip=10.0)
    torch.testing.assert_close(clean.detach(), torch.tensor([0.0, 0.0, -10.0, 3.0]))
    clean.sum().backward()
    torch.testing.assert_close(scores.grad, torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_pairwise_loss_regulariser_metrics_and_gradients():
    scores = _scores()
    out = discriminator_loss(**scores, valid=VALID)
    cap_loss = (softplus(-2.0) + softplus(1.0)) / 2  # margins 3-1 and 1-2 over the 2 valid samples
    cot_loss = softplus(-1.0)  # margins 1-0 and 1-0
    expected = {
        "d_loss": cap_loss + cot_loss + 0.001 * SCORE_REG,
        "cap_loss": cap_loss,
        "cot_loss": cot_loss,
        "d_acc": 0.75,
        "cap_acc": 0.5,
        "cot_acc": 1.0,
        "valid_ratio": 2 / 3,
        "score_reg": SCORE_REG,
        "score_reg_loss": 0.001 * SCORE_REG,
        "student_caption_mean": 3.5 / 3,
        "teacher_caption_mean": 14 / 3,
        "student_cot_mean": -1 / 3,
        "teacher_cot_mean": 4 / 3,
    }
    assert set(out.metrics) == set(DISCRIMINATOR_METRICS)
    for name, value in expected.items():
        torch.testing.assert_close(out.metrics[name], torch.tensor(value), msg=name)
    torch.testing.assert_close(out.loss.detach(), torch.tensor(expected["d_loss"]))

    out.loss.backward()
    reg_grad = 0.001 / 4 * 2 / 3  # d(0.001 * 1/4 * mean x^2)/dx_i per unit of x_i
    torch.testing.assert_close(
        scores["student_caption"].grad,
        torch.tensor([sigmoid(-2.0) / 2 + reg_grad * 1.0, sigmoid(1.0) / 2 + reg_grad * 2.0, reg_grad * 0.5]),
    )
    # The NaN score gets no gradient; the clipped teacher caption 12 gets none either.
    assert scores["student_cot"].grad[1] == 0.0
    assert scores["teacher_caption"].grad[2] == 0.0
    torch.testing.assert_close(scores["teacher_cot"].grad[2], torch.tensor(reg_grad * 2.0))


def test_fallback_when_no_rank_has_a_valid_sample():
    out = discriminator_loss(**_scores(), valid=torch.zeros(3, dtype=torch.bool), num_valid_global=0)
    cap_fb = 0.01 * softplus(-14 / 3)  # mean clipped teacher caption
    cot_fb = 0.01 * softplus(-4 / 3)
    torch.testing.assert_close(out.loss.detach(), torch.tensor(cap_fb + cot_fb + 0.001 * SCORE_REG))
    torch.testing.assert_close(out.metrics["cap_loss"], torch.tensor(cap_fb))
    torch.testing.assert_close(out.metrics["cap_acc"], torch.tensor(0.92))
    torch.testing.assert_close(out.metrics["d_acc"], torch.tensor(0.92))
    torch.testing.assert_close(out.metrics["valid_ratio"], torch.tensor(0.0))


def test_rank_without_valid_samples_while_others_have_some_trains_only_the_regulariser():
    out = discriminator_loss(**_scores(), valid=torch.zeros(3, dtype=torch.bool), num_valid_global=5)
    torch.testing.assert_close(out.loss.detach(), torch.tensor(0.001 * SCORE_REG))
    torch.testing.assert_close(out.metrics["cot_acc"], torch.tensor(0.92))


def test_warmup_loss_with_aux_term():
    out = pairwise_warmup_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), aux_loss=torch.tensor(0.5))
    torch.testing.assert_close(out.loss, torch.tensor((softplus(-1.0) + softplus(1.0)) / 2 + 0.01 * 0.5))
    torch.testing.assert_close(out.metrics["acc"], torch.tensor(0.5))


@pytest.mark.parametrize("aux_coef", [0.0, 0.01])
def test_warmup_loss_aux_coefficient(aux_coef):
    out = pairwise_warmup_loss(torch.zeros(1), torch.zeros(1), aux_loss=2.0, aux_coef=aux_coef)
    torch.testing.assert_close(out.loss, torch.tensor(math.log(2.0) + 2.0 * aux_coef))
