"""DAPO reward shaping and dynamic sampling (PRISM_SPEC §5.1, §5.2).

Overlong penalty: with max response length Lmax, buffer B and factor k, a response of |y| tokens gets
`min(0, -(|y| - (Lmax - B)) / B * k)` added to its score: 0 up to Lmax - B tokens, falling linearly to -k at Lmax.

Group filtering ("dynamic sampling"): a prompt whose responses all have the same accuracy (all right or all wrong)
has zero GRPO advantage everywhere and teaches nothing, so it is dropped. The trainer generates batches of prompts
until enough informative groups are kept, truncates to the target, and fails after a bounded number of batches.
`informative_sample_mask` is the pure filter; `collect_informative_groups` is the loop around a `generate_batch()`
callable, so the RLVR stage stays short.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from prism_mcore.algorithms.groups import group_reduce

Item = TypeVar("Item")


def overlong_penalty(
    response_lengths: torch.Tensor,
    *,
    max_response_length: int = 8192,
    buffer_length: int = 4096,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """Per-sample reward penalty (<= 0) for responses longer than `max_response_length - buffer_length` tokens."""
    expected_length = max_response_length - buffer_length
    excess = response_lengths.float() - expected_length
    return (-excess / buffer_length * penalty_factor).clamp(max=0.0)


def informative_sample_mask(accuracies: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """True for the samples whose group's accuracies are not all equal; singleton groups are kept.

    Spread is tested as max != min rather than std > 0, which is the same condition without float round-off.
    A singleton group has no spread to measure; it is kept so that runs with n = 1 are not filtered to nothing.
    """
    accuracies = accuracies.float()
    spread = group_reduce(accuracies, group_ids, "amax") > group_reduce(accuracies, group_ids, "amin")
    group_size = group_reduce(torch.ones_like(accuracies), group_ids, "sum")
    return spread | (group_size == 1)


@dataclass
class DynamicSamplingResult(Generic[Item]):
    groups: list[Sequence[Item]]  # exactly the requested number of informative groups
    num_generation_batches: int
    num_generated_groups: int  # kept or not, for the "filtered ratio" metric


def collect_informative_groups(
    generate_batch: Callable[[], Sequence[Sequence[Item]]],
    accuracy_of: Callable[[Item], float],
    num_groups: int,
    *,
    max_generation_batches: int = 10,
) -> DynamicSamplingResult[Item]:
    """Call `generate_batch()` (a list of groups, each the responses to one prompt) until `num_groups` informative
    groups are collected; return the first `num_groups` of them. Raises RuntimeError after `max_generation_batches`
    batches that together do not yield enough."""
    if max_generation_batches < 1:
        raise ValueError(f"max_generation_batches must be >= 1, got {max_generation_batches}")
    kept: list[Sequence[Item]] = []
    generated = 0
    for batch_index in range(1, max_generation_batches + 1):
        groups = generate_batch()
        generated += len(groups)
        sizes = torch.tensor([len(group) for group in groups])
        group_ids = torch.repeat_interleave(torch.arange(len(groups)), sizes)
        accuracies = torch.tensor([accuracy_of(item) for group in groups for item in group], dtype=torch.float32)
        keep = informative_sample_mask(accuracies, group_ids)
        first_of_group = torch.cumsum(sizes, 0) - sizes
        kept.extend(
            group for group, keep_group in zip(groups, keep[first_of_group].tolist(), strict=True) if keep_group
        )
        if len(kept) >= num_groups:
            return DynamicSamplingResult(kept[:num_groups], batch_index, generated)
    raise RuntimeError(
        f"dynamic sampling kept {len(kept)} of the {num_groups} groups needed after {max_generation_batches} "
        f"generation batches ({generated} groups generated); most prompts are all-correct or all-wrong. Raise "
        "max_generation_batches or the generation batch size, or use data of more suitable difficulty."
    )
