"""PRISM's formulas in plain PyTorch: advantages, policy losses and their aggregation, discriminator losses, the MoE
load-balancing loss, DAPO shaping and filtering, KL estimators, log-prob/entropy from logits, and the
rollout-vs-trainer log-prob mismatch.

This package imports only torch and the standard library, so every formula of PRISM_SPEC.md can be read and tested
without Megatron. The Triton kernels in `prism_kernels` are checked against these functions.
"""

from prism_mcore.algorithms.advantages import (
    AdvantageMode,
    AlignmentAdvantageConfig,
    alignment_advantage,
    grpo_advantage,
    replace_invalid_scores,
)
from prism_mcore.algorithms.dapo import (
    DynamicSamplingResult,
    collect_informative_groups,
    informative_sample_mask,
    overlong_penalty,
)
from prism_mcore.algorithms.discriminator_loss import (
    DISCRIMINATOR_METRICS,
    DiscriminatorLossConfig,
    DiscriminatorLossOutput,
    discriminator_loss,
    pairwise_warmup_loss,
    sanitize_scores,
)
from prism_mcore.algorithms.groups import group_ids_from_uids, group_mean_std, group_normalize
from prism_mcore.algorithms.kl import KLEstimator, kl_estimate
from prism_mcore.algorithms.logprobs import combine_vocab_shards, linear_logprobs_and_entropy, logprobs_and_entropy
from prism_mcore.algorithms.mismatch import LogProbMismatch, logprob_mismatch
from prism_mcore.algorithms.moe_aux import load_balancing_loss
from prism_mcore.algorithms.policy_loss import (
    POLICY_LOSS_PRESETS,
    LossAggregation,
    PolicyLossConfig,
    PolicyLossOutput,
    RatioLevel,
    aggregate_loss,
    masked_mean,
    policy_loss,
    policy_loss_preset,
    truncated_importance_weights,
)

__all__ = [
    "DISCRIMINATOR_METRICS",
    "POLICY_LOSS_PRESETS",
    "AdvantageMode",
    "AlignmentAdvantageConfig",
    "DiscriminatorLossConfig",
    "DiscriminatorLossOutput",
    "DynamicSamplingResult",
    "KLEstimator",
    "LogProbMismatch",
    "LossAggregation",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "RatioLevel",
    "aggregate_loss",
    "alignment_advantage",
    "collect_informative_groups",
    "combine_vocab_shards",
    "discriminator_loss",
    "group_ids_from_uids",
    "group_mean_std",
    "group_normalize",
    "grpo_advantage",
    "informative_sample_mask",
    "kl_estimate",
    "linear_logprobs_and_entropy",
    "load_balancing_loss",
    "logprob_mismatch",
    "logprobs_and_entropy",
    "masked_mean",
    "overlong_penalty",
    "pairwise_warmup_loss",
    "policy_loss",
    "policy_loss_preset",
    "replace_invalid_scores",
    "sanitize_scores",
    "truncated_importance_weights",
]
