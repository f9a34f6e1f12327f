"""Group statistics, GRPO advantage and the six alignment-advantage modes against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from prism_mcore.algorithms import (
    AdvantageMode,
    AlignmentAdvantageConfig,
    alignment_advantage,
    group_ids_from_uids,
    group_mean_std,
    grpo_advantage,
    replace_invalid_scores,
)

EPS = 1e-6

# Three groups, interleaved: g0 = [1, 2, 3] (mean 2, unbiased std 1), g1 = [4, 8] (mean 6, std sqrt(8)),
# g2 = [9] (a singleton: mean 0, std 1 by convention).
VALUES = torch.tensor([1.0, 4.0, 2.0, 9.0, 3.0, 8.0])
GROUPS = torch.tensor([0, 1, 0, 2, 0, 1])


def test_group_ids_from_uids_numbers_in_first_appearance_order():
    assert group_ids_from_uids(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 0, 2, 1]


def test_group_mean_std_unbiased_with_singleton_convention():
    mean, std = group_mean_std(VALUES, GROUPS)
    torch.testing.assert_close(mean, torch.tensor([2.0, 6.0, 2.0, 0.0, 2.0, 6.0]))
    torch.testing.assert_close(std, torch.tensor([1.0, math.sqrt(8), 1.0, 1.0, 1.0, math.sqrt(8)]))


def test_grpo_advantage_normalises_by_std_plus_eps():
    expected = torch.tensor(
        [-1 / (1 + EPS), -2 / (math.sqrt(8) + EPS), 0.0, 9 / (1 + EPS), 1 / (1 + EPS), 2 / (math.sqrt(8) + EPS)]
    )
    torch.testing.assert_close(grpo_advantage(VALUES, GROUPS), expected)


def test_grpo_advantage_without_std_only_centres():
    expected = torch.tensor([-1.0, -2.0, 0.0, 9.0, 1.0, 2.0])
    torch.testing.assert_close(grpo_advantage(VALUES, GROUPS, norm_by_std=False), expected)


def test_grpo_advantage_of_equal_rewards_is_zero():
    torch.testing.assert_close(grpo_advantage(torch.ones(4), torch.zeros(4, dtype=torch.long)), torch.zeros(4))


def test_replace_invalid_scores_uses_group_valid_minimum_minus_one():
    scores = torch.tensor([0.5, 2.0, 0.0, -1.0, 0.0, 0.0])
    valid = torch.tensor([True, True, False, True, False, False])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])  # group 1 has no valid sample
    expected = torch.tensor([0.5, 2.0, -2.0, -1.0, -1.0, -1.0])
    torch.testing.assert_close(replace_invalid_scores(scores, valid, groups), expected)


def test_mode1_released_default_hand_computed():
    # Group 0 (4 samples, sample 2 invalid), group 1 (3 samples, none valid), group 2 (a valid singleton).
    caption = torch.tensor([1.0, 3.0, 0.0, 2.0, 0.0, 0.0, 0.0, 4.0])
    cot = torch.tensor([2.0, 2.0, 0.0, 4.0, 0.0, 0.0, 0.0, -2.0])
    valid = torch.tensor([True, True, False, True, False, False, False, True])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    # Group 0 after replacement: caption [1, 3, 0, 2] (mean 1.5, var 5/3), cot [2, 2, 1, 4] (mean 2.25, var 19/12).
    cap_hat = torch.tensor([-0.5, 1.5, -1.5, 0.5]) / (math.sqrt(5 / 3) + EPS)
    cot_hat = torch.tensor([-0.25, -0.25, -1.25, 1.75]) / (math.sqrt(19 / 12) + EPS)
    group0 = 0.5 * cap_hat + 0.5 * cot_hat - 1.5 * torch.tensor([0.0, 0.0, 1.0, 0.0])
    group1 = torch.full((3,), -1.5)  # all replaced by -1: normalised to 0, then the format penalty
    group2 = torch.tensor([0.5 * (4.0 - 2.0) / (1 + EPS)])
    expected = torch.cat([group0, group1, group2])
    torch.testing.assert_close(alignment_advantage(caption, cot, valid, groups), expected)


# One group: s0 right, s1 valid but wrong (W=1), s2 invalid (F=1), s3 right. Caption and CoT scores are equal, so
# A_align = GN(c) with c = [2, 0, -1 (replaced: min valid 0 minus 1), 2]: mean 0.75, std 1.5.
MODE_CAPTION = torch.tensor([2.0, 0.0, 0.0, 2.0])
MODE_VALID = torch.tensor([True, True, False, True])
MODE_ACC = torch.tensor([1.0, 0.0, 0.0, 1.0])
MODE_FMT = torch.tensor([1.0, 1.0, 0.0, 1.0])
MODE_CONFIG = dict(wrong_penalty=2.0, format_penalty=1.5, align_coef=2.0, acc_weight=1.0, format_weight=0.5)
C_HAT = torch.tensor([1.25, -0.75, -1.75, 1.25]) / (1.5 + EPS)
W = torch.tensor([0.0, 1.0, 0.0, 0.0])
F = torch.tensor([0.0, 0.0, 1.0, 0.0])
# acc + 0.5 fmt = [1.5, 0.5, 0, 1.5] (mean 0.875, std 0.75); with -2W - 1.5F it becomes [1.5, -1.5, -1.5, 1.5]
# (mean 0, std sqrt(3)); sign_align's valid*(rule - 2W) - 1.5F is the same vector.
GN_RULE = torch.tensor([0.625, -0.375, -0.875, 0.625]) / (0.75 + EPS)
GN_PENALISED = torch.tensor([1.5, -1.5, -1.5, 1.5]) / (math.sqrt(3) + EPS)

MODE_EXPECTED = {
    AdvantageMode.MULTI_REWARD: C_HAT - 1.5 * F,
    AdvantageMode.ACC_GATING: 2 * C_HAT - 2 * W - 1.5 * F,
    AdvantageMode.GATED_ALIGN: 2 * C_HAT * (1 - F) * (1 - W) - 2 * W - 1.5 * F,
    AdvantageMode.RLVR: GN_RULE + 2 * C_HAT * (1 - F) * (1 - W),
    AdvantageMode.RLVR_V2: GN_PENALISED + 2 * C_HAT * (1 - F) * (1 - W),
    AdvantageMode.SIGN_ALIGN: GN_PENALISED + 2 * C_HAT * (1 - F) * (1 - 2 * W),
}


@pytest.mark.parametrize("mode", list(AdvantageMode))
def test_every_mode_matches_hand_computed_values(mode):
    config = AlignmentAdvantageConfig(mode=mode, **MODE_CONFIG)
    advantage = alignment_advantage(
        MODE_CAPTION,
        MODE_CAPTION.clone(),
        MODE_VALID,
        torch.zeros(4, dtype=torch.long),
        accuracy=MODE_ACC,
        format_reward=MODE_FMT,
        config=config,
    )
    torch.testing.assert_close(advantage, MODE_EXPECTED[mode])


def test_spot_values_of_the_mode_table():
    # Guards the shared constants above against a sign slip: two entries written out as numbers.
    torch.testing.assert_close(MODE_EXPECTED[AdvantageMode.GATED_ALIGN], torch.tensor([5 / 3, -2.0, -1.5, 5 / 3]))
    torch.testing.assert_close(
        MODE_EXPECTED[AdvantageMode.SIGN_ALIGN],
        torch.tensor([math.sqrt(3) / 2 + 5 / 3, -math.sqrt(3) / 2 + 1.0, -math.sqrt(3) / 2, math.sqrt(3) / 2 + 5 / 3]),
        atol=1e-5,
        rtol=1e-5,
    )


def test_modes_other_than_mode1_need_the_rule_reward():
    with pytest.raises(ValueError, match="accuracy"):
        alignment_advantage(
            MODE_CAPTION,
            MODE_CAPTION,
            MODE_VALID,
            torch.zeros(4, dtype=torch.long),
            config=AlignmentAdvantageConfig("rlvr"),
        )


def test_config_accepts_mode_strings_and_has_released_defaults():
    config = AlignmentAdvantageConfig()
    assert (config.mode, config.caption_weight, config.cot_weight, config.format_penalty) == (
        "multi_reward",
        0.5,
        0.5,
        1.5,
    )
    assert AlignmentAdvantageConfig(mode="rlvr_v2").mode is AdvantageMode.RLVR_V2
    with pytest.raises(ValueError):
        AlignmentAdvantageConfig(mode="use_rlvr")
