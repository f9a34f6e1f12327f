"""Policy loss (PPO with dual clip, GSPO), aggregation modes, TIS and presets against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from prism_mcore.algorithms import (
    LossAggregation,
    PolicyLossConfig,
    RatioLevel,
    aggregate_loss,
    policy_loss,
    policy_loss_preset,
    truncated_importance_weights,
)

# One sequence of 4 response tokens plus a padded 5th. Ratios r = [1.5, 0.5, 1.1, 5.0], advantages [1, 1, -1, -1]:
#   t0: clipped (max(-1.5, -1.2) = -1.2)      t1: unclipped (-0.5)
#   t2: unclipped (1.1)                        t3: max(5, 1.2) = 5, then the dual clip min(5, 3) = 3 (grpo)
PPO_RATIOS = [1.5, 0.5, 1.1, 5.0, 7.0]
PPO_ADVANTAGES = torch.tensor([[1.0, 1.0, -1.0, -1.0, 4.0]])
PPO_MASK = torch.tensor([[1, 1, 1, 1, 0]])


def _ppo_inputs():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    log_probs = (old + torch.log(torch.tensor([PPO_RATIOS]))).requires_grad_()
    return log_probs, old


def test_grpo_ppo_loss_clip_and_dual_clip():
    log_probs, old = _ppo_inputs()
    out = policy_loss(log_probs, old, PPO_ADVANTAGES, PPO_MASK, policy_loss_preset("grpo"))
    torch.testing.assert_close(out.loss, torch.tensor((-1.2 - 0.5 + 1.1 + 3.0) / 4))
    torch.testing.assert_close(out.metrics["pg_clipfrac"], torch.tensor(0.25))
    torch.testing.assert_close(out.metrics["pg_clipfrac_lower"], torch.tensor(0.25))
    torch.testing.assert_close(out.metrics["ppo_kl"], torch.tensor(-math.log(1.5 * 0.5 * 1.1 * 5.0) / 4))
    out.loss.backward()
    # d(-A r)/d logp = -A r on unclipped tokens, 0 where a clip is active; /4 for the token mean.
    torch.testing.assert_close(log_probs.grad, torch.tensor([[0.0, -0.5 / 4, 1.1 / 4, 0.0, 0.0]]))


def test_dapo_clip_higher_and_looser_dual_clip():
    log_probs, old = _ppo_inputs()
    out = policy_loss(log_probs, old, PPO_ADVANTAGES, PPO_MASK, policy_loss_preset("dapo"))
    # t0 clips at 1.28; t3's loss 5 stays under the dual bound 10.
    torch.testing.assert_close(out.loss, torch.tensor((-1.28 - 0.5 + 1.1 + 5.0) / 4))
    torch.testing.assert_close(out.metrics["pg_clipfrac_lower"], torch.tensor(0.0))


def test_per_sequence_advantages_broadcast_over_tokens():
    log_probs, old = _ppo_inputs()
    config = policy_loss_preset("grpo")
    per_token = policy_loss(log_probs, old, torch.full((1, 5), -1.0), PPO_MASK, config).loss
    per_sequence = policy_loss(log_probs, old, torch.tensor([-1.0]), PPO_MASK, config).loss
    torch.testing.assert_close(per_sequence, per_token)


def test_gspo_sequence_ratio_with_token_surrogate():
    # Sequence 0: log ratios [0.1, -0.3, 0.5] -> s = e^0.1, A = +1: clipped to 1 + 4e-4 on every token.
    # Sequence 1: log ratios [1e-4, 1e-4] (+ one padded token) -> s = e^1e-4, A = -2: inside the clip range.
    old = torch.zeros(2, 3)
    log_probs = torch.tensor([[0.1, -0.3, 0.5], [1e-4, 1e-4, 3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = policy_loss(log_probs, old, torch.tensor([1.0, -2.0]), mask, policy_loss_preset("gspo"))
    seq1 = 2 * math.exp(1e-4)
    torch.testing.assert_close(out.loss, torch.tensor((-(1 + 4e-4) + seq1) / 2))
    torch.testing.assert_close(out.metrics["pg_clipfrac"], torch.tensor(3 / 5))
    torch.testing.assert_close(out.metrics["pg_clipfrac_lower"], torch.tensor(0.0))
    out.loss.backward()
    # Only the token's own log-prob carries gradient: d(-A s_it)/d logp_t = -A s_it, times 1/2 (sequences) * 1/2.
    expected_grad = torch.tensor([[0.0, 0.0, 0.0], [seq1 / 4, seq1 / 4, 0.0]])
    torch.testing.assert_close(log_probs.grad, expected_grad)


def test_gspo_clamps_log_ratio_at_ten():
    log_probs = torch.full((1, 2), 12.0, requires_grad=True)
    out = policy_loss(log_probs, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2), policy_loss_preset("gspo"))
    torch.testing.assert_close(out.loss, torch.tensor(math.exp(10.0)))
    out.loss.backward()
    torch.testing.assert_close(log_probs.grad, torch.zeros(1, 2))


AGG_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
AGG_MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the third sequence is empty


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 4) / 3),
        ("seq-mean-token-mean", (1.5 + 4) / 2),
        ("seq-mean-token-sum", (3 + 4) / 2),
    ],
)
def test_aggregation_modes(mode, expected):
    torch.testing.assert_close(aggregate_loss(AGG_LOSS, AGG_MASK, mode), torch.tensor(expected))


def test_global_token_mean_divides_by_the_given_count():
    torch.testing.assert_close(
        aggregate_loss(AGG_LOSS, AGG_MASK, "global-token-mean", global_token_count=10), torch.tensor(0.7)
    )
    with pytest.raises(ValueError, match="global_token_count"):
        aggregate_loss(AGG_LOSS, AGG_MASK, LossAggregation.GLOBAL_TOKEN_MEAN)


def test_global_token_mean_summed_over_micro_batches_is_the_step_token_mean():
    # Micro-batches of unequal token counts: token-mean per micro-batch would weight them wrongly, the global mean
    # summed over micro-batches (as gradient accumulation does) equals the token mean of the whole step.
    torch.manual_seed(0)
    per_token = torch.randn(4, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    total = int(mask.sum())
    summed = sum(
        aggregate_loss(per_token[rows], mask[rows], "global-token-mean", global_token_count=total)
        for rows in (slice(0, 1), slice(1, 4))
    )
    torch.testing.assert_close(summed, aggregate_loss(per_token, mask, "token-mean"))


def test_truncated_importance_sampling_weights_tokens_without_gradient():
    rollout = torch.log(torch.tensor([[2.0, 1 / 3, 1.0]])).requires_grad_()
    weights = truncated_importance_weights(torch.zeros(1, 3), rollout, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 2.0, 1.0]]))  # exp(0 - log(1/3)) = 3 capped at 2
    assert not weights.requires_grad

    log_probs = torch.zeros(1, 3, requires_grad=True)  # ratio 1: per-token loss -A = -1
    config = policy_loss_preset("grpo", tis_cap=2.0)
    out = policy_loss(
        log_probs, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3), config, rollout_log_probs=rollout
    )
    torch.testing.assert_close(out.loss, torch.tensor(-(0.5 + 2.0 + 1.0) / 3))
    with pytest.raises(ValueError, match="rollout_log_probs"):
        policy_loss(log_probs, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3), config)


def test_presets_equal_the_released_recipes():
    def summary(name):
        c = policy_loss_preset(name)
        return (c.clip_low, c.clip_high, c.dual_clip, c.ratio_level, c.aggregation, c.tis_cap)

    assert summary("prism_align") == (0.2, 0.2, 3.0, "token", "token-mean", None)
    assert summary("grpo") == (0.2, 0.2, 3.0, "token", "token-mean", None)
    assert summary("dapo") == (0.2, 0.28, 10.0, "token", "token-mean", None)
    assert summary("gspo") == (3e-4, 4e-4, None, "sequence", "seq-mean-token-mean", None)
    with pytest.raises(ValueError, match="unknown"):
        policy_loss_preset("ppo2")


def test_config_validation():
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossConfig(dual_clip=1.0)
    with pytest.raises(ValueError, match="no dual clip"):
        PolicyLossConfig(ratio_level=RatioLevel.SEQUENCE, dual_clip=3.0)
    assert PolicyLossConfig(aggregation="seq-mean-token-sum").aggregation is LossAggregation.SEQ_MEAN_TOKEN_SUM
