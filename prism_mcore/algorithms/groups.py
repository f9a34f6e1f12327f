"""Per-group statistics over the n responses to one prompt (PRISM_SPEC §4 step 2, §5.1).

Every advantage in PRISM is normalised within a group, the responses sampled for one prompt. The statistics follow
the reference exactly: the mean and the *unbiased* standard deviation of the group, except that a group of size 1
uses mean 0 and std 1 (its single sample keeps its raw value instead of collapsing to 0).

Groups are given as one integer id per sample, in any order; `group_ids_from_uids` turns `Sample.uid` strings into
such ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def group_ids_from_uids(uids: Sequence[str]) -> torch.Tensor:
    """Integer group ids (0, 1, ... in order of first appearance) for per-sample prompt uids."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(uid, len(index)) for uid in uids], dtype=torch.long)


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids to dense indices 0..G-1; returns (per-sample dense index, G)."""
    unique_ids, dense = torch.unique(group_ids, return_inverse=True)
    return dense, int(unique_ids.numel())


def group_reduce(values: torch.Tensor, group_ids: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduce `values` within each group ("sum", "amin", "amax", ...) and broadcast the result back per sample."""
    dense, num_groups = group_index(group_ids)
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    out = out.scatter_reduce(0, dense, values, reduce=reduce, include_self=False)
    return out[dense]


def group_mean_std(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample group mean and unbiased group std of a 1-D tensor; size-1 groups get mean 0 and std 1."""
    if values.dim() != 1 or values.shape != group_ids.shape:
        raise ValueError(
            f"values {tuple(values.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D shapes"
        )
    dense, num_groups = group_index(group_ids)
    counts = torch.bincount(dense, minlength=num_groups).to(values.dtype)
    mean = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, dense, values) / counts
    # Two passes (mean first, then squared deviations) so that large, nearly equal scores do not cancel.
    squared_dev = (values - mean[dense]) ** 2
    sum_sq = torch.zeros_like(mean).index_add(0, dense, squared_dev)
    std = (sum_sq / (counts - 1).clamp(min=1)).sqrt()
    singleton = counts == 1
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    std = torch.where(singleton, torch.ones_like(std), std)
    return mean[dense], std[dense]


def group_normalize(
    values: torch.Tensor, group_ids: torch.Tensor, *, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """`(x - mean_g) / (std_g + eps)`, or `x - mean_g` when `norm_by_std` is False (the "GN" of PRISM_SPEC §4)."""
    mean, std = group_mean_std(values, group_ids)
    centred = values - mean
    return centred / (std + eps) if norm_by_std else centred
