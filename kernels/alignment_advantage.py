"""Fused alignment advantage (PRISM_SPEC §4): one Triton program per group does the invalid-score replacement, both
group normalisations, the caption/CoT weighting and the mode's penalties, for all six advantage modes.

Reference: `prism_mcore.algorithms.alignment_advantage` (same arguments, same result). The torch reference takes
about a dozen scatter/gather launches per normalisation; here a stable sort by group id (which leaves already
grouped batches in place) lays the samples out group by group, and a single launch computes everything, each program
holding its group (n = 16 in the recipes) in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from prism_kernels.runtime import Backend, resolve_backend

from prism_mcore.algorithms.advantages import AlignmentAdvantageConfig, alignment_advantage


@triton.jit
def _group_normalize(values, in_group, count, eps):
    """(x - mean) / (std + eps) with the unbiased std; a group of one uses mean 0 and std 1."""
    n = count.to(tl.float32)
    mean = tl.sum(tl.where(in_group, values, 0.0), axis=0) / n
    deviation = tl.where(in_group, values - mean, 0.0)
    std = tl.sqrt(tl.sum(deviation * deviation, axis=0) / tl.maximum(n - 1.0, 1.0))
    mean = tl.where(count == 1, 0.0, mean)
    std = tl.where(count == 1, 1.0, std)
    return (values - mean) / (std + eps)


@triton.jit
def _replace_invalid(scores, valid, has_valid):
    """Invalid samples take the group's minimum valid score minus 1, or -1 if no sample of the group is valid."""
    valid_min = tl.min(tl.where(valid, scores, float("inf")), axis=0)
    return tl.where(valid, scores, tl.where(has_valid, valid_min - 1.0, -1.0))


@triton.jit
def _alignment_advantage_kernel(
    order_ptr,
    group_start_ptr,
    group_size_ptr,
    caption_ptr,
    cot_ptr,
    valid_ptr,
    accuracy_ptr,
    format_reward_ptr,
    out_ptr,
    caption_weight,
    cot_weight,
    format_penalty,
    wrong_penalty,
    align_coef,
    acc_weight,
    format_weight,
    eps,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    group = tl.program_id(0)
    start = tl.load(group_start_ptr + group)
    count = tl.load(group_size_ptr + group)
    lane = tl.arange(0, BLOCK)
    in_group = lane < count
    sample = tl.load(order_ptr + start + lane, mask=in_group, other=0)

    valid_flag = tl.load(valid_ptr + sample, mask=in_group, other=0)
    valid = in_group & (valid_flag != 0)
    invalid = (in_group & (valid_flag == 0)).to(tl.float32)
    has_valid = tl.sum(valid.to(tl.int32), axis=0) > 0
    caption = _replace_invalid(tl.load(caption_ptr + sample, mask=in_group, other=0.0), valid, has_valid)
    cot = _replace_invalid(tl.load(cot_ptr + sample, mask=in_group, other=0.0), valid, has_valid)
    align = caption_weight * _group_normalize(caption, in_group, count, eps) + cot_weight * _group_normalize(
        cot, in_group, count, eps
    )

    if MODE == "multi_reward":
        advantage = align - format_penalty * invalid
    else:
        accuracy = tl.load(accuracy_ptr + sample, mask=in_group, other=0.0)
        format_reward = tl.load(format_reward_ptr + sample, mask=in_group, other=0.0)
        valid_f = 1.0 - invalid
        wrong = (accuracy <= 0.0).to(tl.float32) * valid_f
        rule = acc_weight * accuracy + format_weight * format_reward
        penalties = wrong_penalty * wrong + format_penalty * invalid
        scaled_align = align_coef * align
        if MODE == "sign_align":
            shaped = valid_f * (rule - wrong_penalty * wrong) - format_penalty * invalid
            advantage = _group_normalize(shaped, in_group, count, eps) + scaled_align * valid_f * (1.0 - 2.0 * wrong)
        elif MODE == "rlvr_v2":
            advantage = _group_normalize(rule - penalties, in_group, count, eps) + scaled_align * valid_f * (
                1.0 - wrong
            )
        elif MODE == "rlvr":
            advantage = _group_normalize(rule, in_group, count, eps) + scaled_align * valid_f * (1.0 - wrong)
        elif MODE == "gated_align":
            advantage = scaled_align * valid_f * (1.0 - wrong) - penalties
        else:  # acc_gating
            advantage = scaled_align - penalties
    tl.store(out_ptr + sample, advantage, mask=in_group)


def fused_alignment_advantage(
    caption_scores: torch.Tensor,
    cot_scores: torch.Tensor,
    format_valid: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    accuracy: torch.Tensor | None = None,
    format_reward: torch.Tensor | None = None,
    config: AlignmentAdvantageConfig | None = None,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """`alignment_advantage` computed by the Triton kernel (or the reference, per `backend`); [B] fp32."""
    config = config or AlignmentAdvantageConfig()
    if resolve_backend(backend, caption_scores.device) is Backend.TORCH:
        return alignment_advantage(
            caption_scores,
            cot_scores,
            format_valid,
            group_ids,
            accuracy=accuracy,
            format_reward=format_reward,
            config=config,
        )
    if config.mode.needs_rule_reward and (accuracy is None or format_reward is None):
        raise ValueError(f"advantage mode {config.mode.value!r} needs the rule reward's accuracy and format_reward")

    order = torch.argsort(group_ids, stable=True)
    _, group_sizes = torch.unique_consecutive(group_ids[order], return_counts=True)
    group_starts = torch.cumsum(group_sizes, 0) - group_sizes
    caption = caption_scores.float().contiguous()
    rule_inputs = (accuracy, format_reward) if config.mode.needs_rule_reward else (caption, caption)
    accuracy_f, format_reward_f = (t.float().contiguous() for t in rule_inputs)
    out = torch.empty_like(caption)
    _alignment_advantage_kernel[(group_sizes.numel(),)](
        order,
        group_starts,
        group_sizes,
        caption,
        cot_scores.float().contiguous(),
        format_valid.to(torch.int8).contiguous(),
        accuracy_f,
        format_reward_f,
        out,
        config.caption_weight,
        config.cot_weight,
        config.format_penalty,
        config.wrong_penalty,
        config.align_coef,
        config.acc_weight,
        config.format_weight,
        config.eps,
        MODE=config.mode.value,
        BLOCK=triton.next_power_of_2(int(group_sizes.max())),
    )
    return out
