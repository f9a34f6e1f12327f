"""Several policy updates per rollout batch (`align.updates_per_rollout`, `rlvr.updates_per_rollout`).

The released recipes take one optimizer step per rollout batch (PRISM_SPEC §3.2, §5.1: mini-batch = train batch), so
the PPO ratio is exactly 1 and the clip and dual clip never bind. With `updates_per_rollout = K > 1` the batch is cut
into K mini-batches in a fixed order (contiguous slices of the samples in group order, sizes differing by at most one)
and each becomes one optimizer step, as verl's `ppo_mini_batch_size` and slime's `--num-steps-per-rollout` do:

1. before the first update, a no-grad forward over every mini-batch records log pi_old at each response token
   (`forward.old_logprobs_forward`): the weights that sampled the batch, so truncated importance sampling
   (`rollout.tis_cap`) still compares the rollout engine's log-probs with these;
2. update k trains on mini-batch k against those old log-probs: from the second update on the weights have moved,
   the ratio departs from 1, and clipping binds (`actor/pg_clipfrac`, `actor/pg_clipfrac_lower`).

With K = 1 nothing of this runs: the one step is exactly the released step (its old log-probs are its own forward's,
detached). Each optimizer step advances the learning-rate schedule once, so a stage's schedule spans
`steps * updates_per_rollout` optimizer steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from prism_mcore.data.samples import SampleBuilder
from prism_mcore.record import Sample
from prism_mcore.runtime import DistEnv
from prism_mcore.training.forward import old_logprobs_forward
from prism_mcore.training.sharding import policy_microbatches
from prism_mcore.training.step import StepResult, forward_only


class Updatable(Protocol):
    """What the updates need of a trained model: its DDP chunks, one optimizer step over micro-batches, and its full
    state on the device for a block (`resident`, for the no-grad pass under idle-state offload)."""

    models: list[torch.nn.Module]

    def resident(self) -> AbstractContextManager[None]: ...

    def step(self, forward_step: Callable, microbatches: list) -> StepResult: ...


def split_minibatches(items: Sequence[Any], count: int) -> list[list[Any]]:
    """`items` cut into `count` contiguous slices in order, sizes differing by at most one (the larger first)."""
    if count < 1:
        raise ValueError(f"updates_per_rollout must be at least 1, got {count}")
    if count > len(items):
        raise ValueError(
            f"updates_per_rollout={count} needs at least {count} samples per rollout batch, got {len(items)}: "
            "take fewer updates or more prompts per step"
        )
    base, extra = divmod(len(items), count)
    slices, start = [], 0
    for index in range(count):
        size = base + (index < extra)
        slices.append(list(items[start : start + size]))
        start += size
    return slices


def policy_minibatches(
    builder: SampleBuilder, env: DistEnv, samples: list[Sample], budget: int, updates: int
) -> list[list[Any]]:
    """The rollout batch cut into `updates` mini-batches (`split_minibatches`), each as this rank's packed policy
    micro-batches of at most `budget` tokens: what `policy_updates` takes."""
    return [policy_microbatches(builder, env, part, budget) for part in split_minibatches(samples, updates)]


def mean_result(results: Sequence[StepResult]) -> StepResult:
    """The updates of one rollout batch as one step record: metrics, gradient norm and learning rate averaged over the
    updates, `skipped` when any update was skipped, filler micro-batches summed; `updates` counts the updates.

    One update is returned as it is (plus `updates` = 1), so the released setting logs the same values as before."""
    count = len(results)

    def mean(values: list[float]) -> float:
        return values[0] if count == 1 else sum(values) / count

    names = results[0].metrics.keys()
    return StepResult(
        metrics={**{name: mean([r.metrics[name] for r in results]) for name in names}, "updates": float(count)},
        grad_norm=mean([r.grad_norm for r in results]),
        lr=mean([r.lr for r in results]),
        skipped=any(r.skipped for r in results),
        filler_microbatches=sum(r.filler_microbatches for r in results),
    )


def record_old_logprobs(models: list[torch.nn.Module], minibatches: list[list[Any]], temperature: float) -> None:
    """Set every micro-batch's `old_logprobs` from a no-grad forward on the current weights (on the last pipeline
    stage; fillers too, harmlessly)."""
    forward_step = old_logprobs_forward(temperature)
    for microbatches in minibatches:
        forward_only(models, forward_step, microbatches)


def policy_updates(
    policy: Updatable, forward_step: Callable, minibatches: list[list[Any]], temperature: float
) -> StepResult:
    """One optimizer step per mini-batch of micro-batches, in order, against the log-probs of the weights before the
    first (module docstring); a single mini-batch is the released one-step update."""
    if len(minibatches) > 1:
        with policy.resident():
            record_old_logprobs(policy.models, minibatches, temperature)
    return mean_result([policy.step(forward_step, microbatches) for microbatches in minibatches])
