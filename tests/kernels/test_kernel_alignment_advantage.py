"""Fused alignment advantage against `prism_mcore.algorithms.alignment_advantage`, every mode."""

from __future__ import annotations

import pytest
import torch
from prism_kernels.alignment_advantage import fused_alignment_advantage

from prism_mcore.algorithms import AdvantageMode, AlignmentAdvantageConfig, alignment_advantage


def _batch(num_groups: int, group_size: int, device: torch.device, seed: int = 0):
    """Shuffled groups with mixed validity; group 0 has no valid sample, the last group is a singleton."""
    gen = torch.Generator().manual_seed(seed)
    group_ids = torch.arange(num_groups).repeat_interleave(group_size)[: num_groups * group_size - group_size + 1]
    order = torch.randperm(group_ids.numel(), generator=gen)
    group_ids = (group_ids[order] * 7 + 3).to(device)  # arbitrary, non-contiguous ids
    size = group_ids.numel()
    valid = torch.rand(size, generator=gen) > 0.3
    valid[group_ids.cpu() == 3] = False
    return dict(
        caption_scores=(4 * torch.randn(size, generator=gen)).to(device),
        cot_scores=(4 * torch.randn(size, generator=gen)).to(device),
        format_valid=valid.to(device),
        group_ids=group_ids,
        accuracy=(torch.rand(size, generator=gen) > 0.5).float().to(device),
        format_reward=valid.float().to(device),
    )


@pytest.mark.parametrize("mode", list(AdvantageMode))
def test_matches_reference_in_every_mode(mode, device):
    batch = _batch(num_groups=5, group_size=6, device=device)
    config = AlignmentAdvantageConfig(mode=mode, wrong_penalty=0.7, align_coef=1.3, acc_weight=0.9, format_weight=0.4)
    expected = alignment_advantage(**batch, config=config)
    got = fused_alignment_advantage(**batch, config=config, backend="triton")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_auto_backend_on_cpu_is_the_reference():
    batch = _batch(num_groups=3, group_size=4, device=torch.device("cpu"))
    assert torch.equal(fused_alignment_advantage(**batch, backend="auto"), alignment_advantage(**batch))


def test_rule_reward_required_outside_mode1(device):
    batch = _batch(num_groups=2, group_size=4, device=device)
    del batch["accuracy"]
    with pytest.raises(ValueError, match="accuracy"):
        fused_alignment_advantage(**batch, config=AlignmentAdvantageConfig(mode="rlvr"), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(AdvantageMode))
def test_matches_reference_at_recipe_scale(mode):
    batch = _batch(num_groups=512, group_size=16, device=torch.device("cuda"))
    config = AlignmentAdvantageConfig(mode=mode)
    expected = alignment_advantage(**batch, config=config)
    torch.testing.assert_close(fused_alignment_advantage(**batch, config=config), expected, rtol=1e-5, atol=1e-6)
