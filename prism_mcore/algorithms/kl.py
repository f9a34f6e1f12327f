"""Per-token KL estimators between the policy and a reference policy (optional; PRISM_SPEC §4, §5.1 run without KL).

With `d = log pi_ref - log pi` evaluated on tokens sampled from pi:
- `k1 = -d = log pi - log pi_ref`: unbiased, high variance, can be negative;
- `k3 = exp(d) - d - 1`: unbiased, non-negative, low variance (Schulman's estimator, verl's `low_var_kl`); `d` is
  clamped to [-20, 20] before the exponential and the estimate to [-10, 10], as the reference does, so single
  outlier tokens cannot dominate the loss.
"""

from __future__ import annotations

from enum import StrEnum

import torch


class KLEstimator(StrEnum):
    K1 = "k1"
    K3 = "k3"


def kl_estimate(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: KLEstimator | str = KLEstimator.K3
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate; same shape as the inputs."""
    estimator = KLEstimator(estimator)
    if estimator is KLEstimator.K1:
        return log_probs - ref_log_probs
    log_ratio = (ref_log_probs - log_probs).clamp(-20.0, 20.0)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)
