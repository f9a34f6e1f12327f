"""Several policy updates per rollout batch (`training/updates.py`): the pre-update log-probs recorded by a no-grad
pass, a first update at ratio 1 (nothing clipped), a later one whose ratio has moved (clipping binds), the updates
logged as one step, and one update exactly the released single step."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from prism_mcore.algorithms import policy_loss_preset
from prism_mcore.config.schema import OptimConfig, ParallelConfig
from prism_mcore.data.batching import pack_sequences
from prism_mcore.data.samples import TokenSequence, mrope_position_ids
from prism_mcore.training.step import StepResult
from prism_mcore.training.updates import mean_result, policy_updates, record_old_logprobs, split_minibatches
from tests.unit.models.conftest import FP32_SDPA
from tests.unit.models.tiny_checkpoints import IMAGE, text_inputs

PROMPT = 4  # the first tokens of each sequence are its prompt; the rest is the response


class TinyTrainable:
    """A policy in DDP with AdamW at a large learning rate, so that one update moves its log-probs visibly."""

    def __init__(self, dense_dir: Path, lr: float = 0.05) -> None:
        from prism_mcore.models import build_policy
        from prism_mcore.training.step import build_optimizer, wrap_ddp

        torch.manual_seed(0)
        handle = build_policy(FP32_SDPA, ParallelConfig(), path=dense_dir)
        self.models = wrap_ddp(handle.chunks, use_distributed_optimizer=False)
        self.optimizer, self.scheduler = build_optimizer(
            self.models, OptimConfig(lr=lr, weight_decay=0.0), 4, use_distributed_optimizer=False, bf16=False
        )

    def resident(self) -> nullcontext:
        return nullcontext()

    def step(self, forward_step, microbatches: list) -> StepResult:
        from prism_mcore.training.step import train_step

        return train_step(self.models, self.optimizer, self.scheduler, forward_step, microbatches)


def _minibatches(count: int) -> list[list]:
    """Eight text sequences with advantages of both signs, cut into `count` mini-batches of one micro-batch each."""
    from prism_mcore.training.forward import token_batch

    ids = text_inputs()["input_ids"][0]
    sequences = []
    for shift in range(8):
        tokens = torch.roll(ids, shift)
        labels = torch.where(torch.arange(len(tokens)) >= PROMPT, tokens, -100)
        sequences.append(TokenSequence(tokens, mrope_position_ids(tokens, None, IMAGE, 2), labels=labels))
    advantages = [1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0]
    parts = split_minibatches(list(range(8)), count)
    return [
        [token_batch(pack_sequences([sequences[i] for i in part]), [advantages[i] for i in part])] for part in parts
    ]


def test_minibatches_are_contiguous_slices_in_order() -> None:
    assert split_minibatches(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_minibatches(["a", "b"], 1) == [["a", "b"]]
    with pytest.raises(ValueError, match="updates_per_rollout=3 needs at least 3 samples"):
        split_minibatches(["a", "b"], 3)


def test_the_updates_are_logged_as_their_mean() -> None:
    first = StepResult({"pg_loss": 1.0, "pg_clipfrac": 0.0}, grad_norm=2.0, lr=1.0, skipped=False)
    second = StepResult(
        {"pg_loss": 0.5, "pg_clipfrac": 0.25}, grad_norm=4.0, lr=0.5, skipped=True, filler_microbatches=1
    )
    both = mean_result([first, second])
    assert both.metrics == {"pg_loss": 0.75, "pg_clipfrac": 0.125, "updates": 2.0}
    assert (both.grad_norm, both.lr, both.skipped, both.filler_microbatches) == (3.0, 0.75, True, 1)
    single = StepResult({"pg_loss": -0.0}, grad_norm=1.5, lr=1e-6, skipped=False)
    assert mean_result([single]) == StepResult({"pg_loss": -0.0, "updates": 1.0}, 1.5, 1e-6, False)


def test_a_second_update_per_rollout_moves_the_ratio_and_clipping_binds(runtime, dense_dir) -> None:
    from prism_mcore.training.forward import policy_forward

    forward_step = policy_forward(policy_loss_preset("grpo"))
    trainable, minibatches = TinyTrainable(dense_dir), _minibatches(2)
    record_old_logprobs(trainable.models, minibatches, temperature=1.0)
    batch = minibatches[0][0]
    assert batch.old_logprobs.shape == batch.loss_mask.shape
    assert bool((batch.old_logprobs[batch.loss_mask] < 0).all()) and not batch.old_logprobs[~batch.loss_mask].any()
    first = trainable.step(forward_step, minibatches[0])
    second = trainable.step(forward_step, minibatches[1])
    # The first update starts from the weights that recorded pi_old: ratio 1 everywhere, nothing clipped.
    assert first.metrics["pg_clipfrac"] == 0.0 and first.metrics["pg_clipfrac_lower"] == 0.0
    assert abs(first.metrics["ppo_kl"]) < 1e-6
    # The second runs on moved weights: pi/pi_old leaves [0.8, 1.2] for some tokens.
    assert second.metrics["pg_clipfrac"] > 0.0
    assert abs(second.metrics["ppo_kl"]) > 1e-3

    # `policy_updates` is those two steps, logged as their mean, on a fresh copy of the same start.
    again = policy_updates(TinyTrainable(dense_dir), forward_step, _minibatches(2), temperature=1.0)
    assert again.metrics["updates"] == 2.0
    for name in ("pg_clipfrac", "pg_loss", "ppo_kl"):
        assert again.metrics[name] == pytest.approx((first.metrics[name] + second.metrics[name]) / 2, abs=1e-6)


def test_one_update_per_rollout_is_the_released_step(runtime, dense_dir) -> None:
    from prism_mcore.training.forward import policy_forward

    forward_step = policy_forward(policy_loss_preset("grpo"))
    expected = TinyTrainable(dense_dir).step(forward_step, _minibatches(1)[0])
    minibatches = _minibatches(1)
    result = policy_updates(TinyTrainable(dense_dir), forward_step, minibatches, temperature=1.0)
    assert minibatches[0][0].old_logprobs is None  # no extra pass
    assert result.metrics == {**expected.metrics, "updates": 1.0}
    assert (result.grad_norm, result.lr, result.skipped) == (expected.grad_norm, expected.lr, expected.skipped)
    assert expected.metrics["pg_clipfrac"] == 0.0  # ratio 1: the released presets' clip never binds
