"""Rollout-vs-trainer log-prob mismatch metrics, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from prism_mcore.algorithms.mismatch import LogProbMismatch, logprob_mismatch


def test_hand_computed_batch() -> None:
    # Two sequences; the last position of the second is padding (masked), with a huge difference that must not count.
    trainer = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]])
    rollout = torch.tensor([[-1.5, -2.0], [-0.1, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    result = logprob_mismatch(trainer, rollout, mask, tis_cap=1.5)
    deltas = [0.5, 0.0, -0.4]  # trainer - rollout on the three response tokens
    assert result.num_tokens == 3
    assert result.mean_abs_diff == pytest.approx((0.5 + 0.0 + 0.4) / 3)
    assert result.max_abs_diff == pytest.approx(0.5)
    assert result.kl_k3 == pytest.approx(sum(math.exp(d) - d - 1 for d in deltas) / 3)
    assert result.tis_clip_frac == pytest.approx(1 / 3)  # exp(0.5) = 1.65 > 1.5; exp(0) and exp(-0.4) are not


def test_identical_logprobs_give_zero_and_no_cap_gives_no_clipping() -> None:
    logprobs = torch.tensor([[-0.3, -2.0, -0.7]])
    result = logprob_mismatch(logprobs, logprobs.clone(), torch.ones(1, 3))
    assert result == LogProbMismatch(0.0, 0.0, 0.0, 0.0, 3)


def test_empty_mask_and_metric_names() -> None:
    empty = logprob_mismatch(torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2), tis_cap=2.0)
    assert empty.num_tokens == 0 and empty.max_abs_diff == 0.0
    assert set(empty.metrics()) == {
        "rollout/logprob_diff_mean",
        "rollout/logprob_diff_max",
        "rollout/logprob_kl_k3",
        "rollout/tis_clip_frac",
    }
    with pytest.raises(ValueError, match="one shape"):
        logprob_mismatch(torch.zeros(2, 2), torch.zeros(2, 3), torch.zeros(2, 2))
