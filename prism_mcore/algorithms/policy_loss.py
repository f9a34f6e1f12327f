"""The one policy-gradient loss behind PRISM alignment, GRPO, DAPO and GSPO (PRISM_SPEC §4, §5.1, §5.2, §8.9).

The algorithms differ only in parameters, so they are one function with a `PolicyLossConfig` and named presets:

| preset        | clip low/high | dual clip c | ratio    | aggregation          |
|---------------|---------------|-------------|----------|----------------------|
| `prism_align` | 0.2 / 0.2     | 3.0         | token    | token-mean           |
| `grpo`        | 0.2 / 0.2     | 3.0         | token    | token-mean           |
| `dapo`        | 0.2 / 0.28    | 10.0        | token    | token-mean           |
| `gspo`        | 3e-4 / 4e-4   | none        | sequence | seq-mean-token-mean  |

Token ratio (vanilla PPO): `r = exp(clamp(logp - old, -20, 20))`, `Lc = max(-A*r, -A*clip(r, 1-eps_lo, 1+eps_hi))`,
and the dual clip `L = min(Lc, -A*c)` where A < 0.
Sequence ratio (GSPO): `log s_i = mean_t(logp - old)` over the response, per-token surrogate
`log s_it = sg[log s_i] + logp - sg[logp]` clamped at 10 above, `L = max(-A*s_it, -A*clip(s_it, ...))`, no dual clip.
(The reference forces seq-mean-token-mean inside its GSPO loss; here the `gspo` preset sets it.)

Optional truncated importance sampling (TIS) corrects for the rollout engine's log-probs differing from the
trainer's: each token's loss is multiplied by `min(exp(old - rollout), cap)`, detached.

Aggregation modes `token-mean`, `seq-mean-token-mean` and `seq-mean-token-sum` are the reference's, computed per
micro-batch (the reference then weights each micro-batch by micro/mini batch size). `global-token-mean` divides the
masked loss sum by a token count the caller supplies (`global_token_count`), so that the optimiser step sees one
token mean over all micro-batches and data-parallel ranks. The train step gets it without a separate count: it
passes 1 and hands Megatron (Σ L·mask, tokens) as numerator and denominator, which are summed over micro-batches
and ranks before the one division (`training.forward.policy_loss_fraction`, `training/step.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

import torch


class LossAggregation(StrEnum):
    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
    GLOBAL_TOKEN_MEAN = "global-token-mean"


class RatioLevel(StrEnum):
    TOKEN = "token"  # PPO: one importance ratio per token
    SEQUENCE = "sequence"  # GSPO: the length-normalised sequence ratio, applied per token


@dataclass(frozen=True)
class PolicyLossConfig:
    """Parameters of the clipped policy loss; see the module docstring for the formulas."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0  # c > 1 bounds the loss of negative-advantage tokens; None disables it
    ratio_level: RatioLevel = RatioLevel.TOKEN
    aggregation: LossAggregation = LossAggregation.TOKEN_MEAN
    tis_cap: float | None = None  # truncated importance sampling cap; None disables TIS

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio_level", RatioLevel(self.ratio_level))
        object.__setattr__(self, "aggregation", LossAggregation(self.aggregation))
        if self.dual_clip is not None:
            if self.dual_clip <= 1.0:
                raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
            if self.ratio_level is RatioLevel.SEQUENCE:
                raise ValueError("the sequence-level (GSPO) ratio has no dual clip; set dual_clip=None")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be positive, got {self.tis_cap}")


POLICY_LOSS_PRESETS: dict[str, PolicyLossConfig] = {
    "prism_align": PolicyLossConfig(clip_low=0.2, clip_high=0.2, dual_clip=3.0),
    "grpo": PolicyLossConfig(clip_low=0.2, clip_high=0.2, dual_clip=3.0),
    "dapo": PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=10.0),
    "gspo": PolicyLossConfig(
        clip_low=3e-4,
        clip_high=4e-4,
        dual_clip=None,
        ratio_level=RatioLevel.SEQUENCE,
        aggregation=LossAggregation.SEQ_MEAN_TOKEN_MEAN,
    ),
}


def policy_loss_preset(name: str, **overrides: object) -> PolicyLossConfig:
    """A released recipe's loss config (`prism_align`, `grpo`, `dapo`, `gspo`), optionally with fields changed."""
    if name not in POLICY_LOSS_PRESETS:
        raise ValueError(f"unknown policy loss preset {name!r}; choose from {sorted(POLICY_LOSS_PRESETS)}")
    return replace(POLICY_LOSS_PRESETS[name], **overrides)


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor]  # pg_clipfrac, pg_clipfrac_lower, ppo_kl: detached scalars


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAggregation | str,
    *,
    global_token_count: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a [B, L] per-token loss to a scalar with one of the aggregation modes (module docstring)."""
    mode = LossAggregation(mode)
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if mode is LossAggregation.TOKEN_MEAN:
        return masked.sum() / mask.sum().clamp(min=1)
    if mode is LossAggregation.GLOBAL_TOKEN_MEAN:
        if global_token_count is None:
            raise ValueError("global-token-mean needs global_token_count (response tokens of the whole step)")
        return masked.sum() / global_token_count
    seq_tokens = mask.sum(dim=-1)
    seq_sum = masked.sum(dim=-1)
    seq_loss = seq_sum / seq_tokens.clamp(min=1) if mode is LossAggregation.SEQ_MEAN_TOKEN_MEAN else seq_sum
    # Sequences without response tokens (possible after truncation) would dilute the mean; leave them out.
    non_empty = (seq_tokens > 0).to(per_token_loss.dtype)
    return (seq_loss * non_empty).sum() / non_empty.sum().clamp(min=1)


def truncated_importance_weights(
    old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Per-token TIS weights `min(exp(old - rollout), cap)`, detached (they rescale, never receive gradient)."""
    return torch.exp(old_log_probs - rollout_log_probs).clamp(max=cap).detach()


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
    *,
    rollout_log_probs: torch.Tensor | None = None,
    global_token_count: int | float | torch.Tensor | None = None,
) -> PolicyLossOutput:
    """Clipped policy-gradient loss of one micro-batch.

    `log_probs` (with gradient), `old_log_probs`, `response_mask`: [B, L]; `advantages`: [B, L] or per-sequence [B].
    `rollout_log_probs` ([B, L]) is required when `config.tis_cap` is set. Metrics are token means over the mask.
    """
    mask = response_mask.to(log_probs.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(log_probs)
    advantages = advantages.to(log_probs.dtype)
    log_ratio = log_probs - old_log_probs

    if config.ratio_level is RatioLevel.TOKEN:
        ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    else:
        seq_log_ratio = (log_ratio * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
        # Value of the sequence ratio, gradient of the token's own log-prob: d s_it / d logp_t = s_it.
        token_log_ratio = seq_log_ratio.detach()[:, None] + log_probs - log_probs.detach()
        ratio = torch.exp(token_log_ratio.clamp(max=10.0))

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    per_token = torch.maximum(unclipped, clipped)
    clip_active = (clipped > unclipped).to(log_probs.dtype)
    lower_active = torch.zeros_like(per_token)
    if config.dual_clip is not None:
        dual_bound = -advantages * config.dual_clip
        negative = advantages < 0
        lower_active = (negative & (per_token > dual_bound)).to(log_probs.dtype)
        per_token = torch.where(negative, torch.minimum(per_token, dual_bound), per_token)

    if config.tis_cap is not None:
        if rollout_log_probs is None:
            raise ValueError("tis_cap is set but no rollout_log_probs were given")
        per_token = per_token * truncated_importance_weights(old_log_probs, rollout_log_probs, config.tis_cap)

    loss = aggregate_loss(per_token, mask, config.aggregation, global_token_count=global_token_count)
    metrics = {
        "pg_clipfrac": masked_mean(clip_active, mask).detach(),
        "pg_clipfrac_lower": masked_mean(lower_active, mask).detach(),
        "ppo_kl": masked_mean(-log_ratio, mask).detach(),
    }
    return PolicyLossOutput(loss=loss, metrics=metrics)
