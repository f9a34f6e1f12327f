"""DAPO overlong penalty, group filter and the dynamic-sampling driver (PRISM_SPEC §5.2)."""

from __future__ import annotations

import pytest
import torch

from prism_mcore.algorithms import collect_informative_groups, informative_sample_mask, overlong_penalty


def test_overlong_penalty_released_defaults():
    lengths = torch.tensor([100, 4096, 6144, 8192])
    torch.testing.assert_close(overlong_penalty(lengths), torch.tensor([0.0, 0.0, -0.5, -1.0]))


def test_overlong_penalty_custom_buffer_and_factor():
    penalty = overlong_penalty(torch.tensor([5, 7, 10]), max_response_length=10, buffer_length=4, penalty_factor=2.0)
    torch.testing.assert_close(penalty, torch.tensor([0.0, -0.5, -2.0]))  # (7-6)/4*2, (10-6)/4*2


def test_informative_sample_mask_keeps_groups_with_spread_and_singletons():
    accuracies = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    expected = [False, False, False, True, True, False, False, True]
    assert informative_sample_mask(accuracies, groups).tolist() == expected


def _generator(batches):
    calls = iter(batches)
    return lambda: next(calls)


def test_collect_informative_groups_over_generates_then_truncates():
    batches = [
        [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]],  # keeps [0, 1]
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],  # keeps [1, 0] and [0, 1]
    ]
    result = collect_informative_groups(_generator(batches), float, num_groups=2)
    assert result.groups == [[0.0, 1.0], [1.0, 0.0]]
    assert (result.num_generation_batches, result.num_generated_groups) == (2, 6)


def test_collect_informative_groups_fails_after_the_batch_limit():
    calls = []

    def all_correct():
        calls.append(1)
        return [[1.0, 1.0], [0.0, 1.0]]

    with pytest.raises(RuntimeError, match="kept 3 of the 4 groups needed after 3 generation batches"):
        collect_informative_groups(all_correct, float, num_groups=4, max_generation_batches=3)
    assert len(calls) == 3
