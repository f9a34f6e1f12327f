"""How far the rollout engine's log-probs are from the trainer's, per batch (a health metric of the rollout path).

The rollout engine (SGLang, LocalEngine) samples response tokens and reports `log mu(y_t)`; the trainer recomputes
`log pi_old(y_t)` on the same weights. They differ by kernels and numerics (bf16, fused attention, batch shapes),
and by real bugs (stale weights, wrong positions, a different sampler). Over the response tokens (`response_mask`):

    delta_t      = log pi_old(y_t) - log mu(y_t)
    mean |delta|, max |delta|
    kl_k3        = mean_t exp(delta_t) - delta_t - 1      k3 estimate of KL(mu || pi_old): the tokens were drawn from mu
    tis_clip_frac = fraction of tokens with exp(delta_t) > tis_cap   (the tokens whose truncated importance weight,
                    `policy_loss.truncated_importance_weights`, is clipped)

`kl_k3` uses `kl.kl_estimate`, with its clamps. With on-policy rollouts and matching numerics every value is ~0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_mcore.algorithms.kl import KLEstimator, kl_estimate


@dataclass(frozen=True)
class LogProbMismatch:
    """Rollout-vs-trainer log-prob agreement over the response tokens of one batch."""

    mean_abs_diff: float
    max_abs_diff: float
    kl_k3: float
    tis_clip_frac: float  # 0 when no cap is given
    num_tokens: int

    def metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        """The values as a metrics dict (`rollout/logprob_diff_mean`, ...) for the run's metrics file."""
        return {
            f"{prefix}logprob_diff_mean": self.mean_abs_diff,
            f"{prefix}logprob_diff_max": self.max_abs_diff,
            f"{prefix}logprob_kl_k3": self.kl_k3,
            f"{prefix}tis_clip_frac": self.tis_clip_frac,
        }


def logprob_mismatch(
    trainer_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    tis_cap: float | None = None,
) -> LogProbMismatch:
    """Mismatch statistics over the tokens where `response_mask` ([B, L], like the log-probs) is 1; all zeros when
    the mask is empty."""
    if trainer_log_probs.shape != rollout_log_probs.shape or trainer_log_probs.shape != response_mask.shape:
        raise ValueError(
            "trainer log-probs, rollout log-probs and response mask must have one shape, got "
            f"{tuple(trainer_log_probs.shape)}, {tuple(rollout_log_probs.shape)}, {tuple(response_mask.shape)}"
        )
    mask = response_mask.bool()
    num_tokens = int(mask.sum())
    if num_tokens == 0:
        return LogProbMismatch(0.0, 0.0, 0.0, 0.0, 0)
    trainer = trainer_log_probs.detach().double()[mask]
    rollout = rollout_log_probs.detach().double()[mask]
    delta = trainer - rollout
    clipped = 0.0 if tis_cap is None else float((torch.exp(delta) > tis_cap).double().mean())
    return LogProbMismatch(
        mean_abs_diff=float(delta.abs().mean()),
        max_abs_diff=float(delta.abs().max()),
        kl_k3=float(kl_estimate(rollout, trainer, KLEstimator.K3).mean()),
        tis_clip_frac=clipped,
        num_tokens=num_tokens,
    )
