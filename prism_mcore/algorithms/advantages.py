"""Advantages: GRPO for RLVR (PRISM_SPEC §5.1) and the multi-reward alignment advantage (PRISM_SPEC §4).

RLVR uses the plain GRPO advantage `A = (R - mean_g R) / (std_g R + 1e-6)` of the scalar verifiable reward.

Alignment combines the discriminator's caption score `c` and CoT score `t` per sample:

1. invalid-format samples get the group's minimum valid score minus 1 (or -1 if the group has no valid sample);
2. both scores are group-normalised and mixed: `A_align = w_cap * GN(c) + w_cot * GN(t)`;
3. a mode turns `A_align` into the advantage. The reference selects the mode with five boolean flags, checked in
   priority order; here it is one `AdvantageMode` value (the table gives the mapping):

   | mode            | reference flag (priority high -> low) | advantage                                              |
   |-----------------|----------------------------------------|--------------------------------------------------------|
   | `sign_align`    | use_sign_align                         | GN((1-F)(wa*acc + wf*fmt - wp*W) - fp*F) + ac*A_align*(1-F)(1-2W) |
   | `rlvr_v2`       | use_rlvr_v2                            | GN(wa*acc + wf*fmt - wp*W - fp*F) + ac*A_align*(1-F)(1-W) |
   | `rlvr`          | use_rlvr                               | GN(wa*acc + wf*fmt) + ac*A_align*(1-F)(1-W)             |
   | `gated_align`   | use_gated_align                        | ac*A_align*(1-F)(1-W) - wp*W - fp*F                     |
   | `acc_gating`    | use_acc_gating                         | ac*A_align - wp*W - fp*F                                |
   | `multi_reward`  | none set (the released Mode 1)         | A_align - fp*F                                          |

   with F = 1[format invalid], W = 1[acc <= 0](1-F) (valid but wrong), acc/fmt from the rule reward (§6), and
   GN the same group normalisation. The advantage is a per-sample scalar; the caller broadcasts it over the
   response tokens, EOS included.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from prism_mcore.algorithms.groups import group_normalize, group_reduce


def grpo_advantage(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantage per sample: the reward normalised within its group (unbiased std; size-1 groups: mean 0, std 1)."""
    return group_normalize(rewards.float(), group_ids, norm_by_std=norm_by_std, eps=eps)


class AdvantageMode(StrEnum):
    """How the alignment advantage combines the discriminator scores with the rule reward (table above)."""

    MULTI_REWARD = "multi_reward"
    SIGN_ALIGN = "sign_align"
    RLVR_V2 = "rlvr_v2"
    RLVR = "rlvr"
    GATED_ALIGN = "gated_align"
    ACC_GATING = "acc_gating"

    @property
    def needs_rule_reward(self) -> bool:
        return self is not AdvantageMode.MULTI_REWARD


@dataclass(frozen=True)
class AlignmentAdvantageConfig:
    """Weights and penalties of the alignment advantage; the defaults are the released script's (Mode 1)."""

    mode: AdvantageMode = AdvantageMode.MULTI_REWARD
    caption_weight: float = 0.5
    cot_weight: float = 0.5
    format_penalty: float = 1.5
    wrong_penalty: float = 1.0
    align_coef: float = 1.0
    acc_weight: float = 1.0
    format_weight: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        # Configs arrive from YAML/CLI as strings; store the enum so comparisons are exact.
        object.__setattr__(self, "mode", AdvantageMode(self.mode))


def replace_invalid_scores(scores: torch.Tensor, format_valid: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Give each invalid-format sample its group's minimum valid score minus 1, or -1 if the group has none valid."""
    valid_or_inf = torch.where(format_valid, scores, torch.full_like(scores, float("inf")))
    group_min = group_reduce(valid_or_inf, group_ids, "amin")
    replacement = torch.where(torch.isfinite(group_min), group_min - 1.0, torch.full_like(group_min, -1.0))
    return torch.where(format_valid, scores, replacement)


def alignment_advantage(
    caption_scores: torch.Tensor,
    cot_scores: torch.Tensor,
    format_valid: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    accuracy: torch.Tensor | None = None,
    format_reward: torch.Tensor | None = None,
    config: AlignmentAdvantageConfig = AlignmentAdvantageConfig(),
) -> torch.Tensor:
    """Per-sample alignment advantage from discriminator scores (PRISM_SPEC §4).

    `caption_scores`, `cot_scores`: [B] float; `format_valid`: [B] bool; `group_ids`: [B] int (one id per prompt).
    `accuracy` and `format_reward` ([B], from the rule reward) are required by every mode except `multi_reward`.
    """
    format_valid = format_valid.bool()
    caption = replace_invalid_scores(caption_scores.float(), format_valid, group_ids)
    cot = replace_invalid_scores(cot_scores.float(), format_valid, group_ids)
    eps = config.eps
    align = config.caption_weight * group_normalize(caption, group_ids, eps=eps) + config.cot_weight * group_normalize(
        cot, group_ids, eps=eps
    )
    invalid = (~format_valid).float()
    if config.mode is AdvantageMode.MULTI_REWARD:
        return align - config.format_penalty * invalid

    if accuracy is None or format_reward is None:
        raise ValueError(f"advantage mode {config.mode.value!r} needs the rule reward's accuracy and format_reward")
    valid = 1.0 - invalid
    wrong = (accuracy <= 0).float() * valid
    rule = config.acc_weight * accuracy.float() + config.format_weight * format_reward.float()
    penalties = config.wrong_penalty * wrong + config.format_penalty * invalid
    scaled_align = config.align_coef * align
    if config.mode is AdvantageMode.SIGN_ALIGN:
        shaped = valid * (rule - config.wrong_penalty * wrong) - config.format_penalty * invalid
        return group_normalize(shaped, group_ids, eps=eps) + scaled_align * valid * (1.0 - 2.0 * wrong)
    if config.mode is AdvantageMode.RLVR_V2:
        return group_normalize(rule - penalties, group_ids, eps=eps) + scaled_align * valid * (1.0 - wrong)
    if config.mode is AdvantageMode.RLVR:
        return group_normalize(rule, group_ids, eps=eps) + scaled_align * valid * (1.0 - wrong)
    if config.mode is AdvantageMode.GATED_ALIGN:
        return scaled_align * valid * (1.0 - wrong) - penalties
    return scaled_align - penalties  # ACC_GATING
