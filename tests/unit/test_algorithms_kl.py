"""KL estimators k1 and k3 (low-variance, clamped) by hand."""

from __future__ import annotations

import math

import torch

from prism_mcore.algorithms import kl_estimate


def test_k1_is_the_log_ratio():
    torch.testing.assert_close(
        kl_estimate(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), "k1"), torch.tensor([math.log(2.0)])
    )


def test_k3_hand_value_and_zero_at_equality():
    # d = log(0.25/0.5) = -log 2: exp(d) - d - 1 = 0.5 + log 2 - 1.
    k3 = kl_estimate(torch.tensor([math.log(0.5), -1.0]), torch.tensor([math.log(0.25), -1.0]), "k3")
    torch.testing.assert_close(k3, torch.tensor([math.log(2.0) - 0.5, 0.0]))


def test_k3_is_clamped_at_ten():
    assert kl_estimate(torch.tensor([-30.0]), torch.tensor([0.0])).item() == 10.0
