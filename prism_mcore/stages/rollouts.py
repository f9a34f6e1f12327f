"""Rollouts for the stages: the rollout engine (rank 0 generates for every rank; one per stage, closed with it),
its memory around training (`awake`), generation with segmentation and the verifiable reward (`rollout`), weight
sync after each update, and the response statistics both RL stages log."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from prism_mcore.models import iter_hf_weights
from prism_mcore.record import Sample
from prism_mcore.rewards import reward_batch
from prism_mcore.rollout import RolloutEngine, SamplingParams, build_rollout_engine, weights_for_sync
from prism_mcore.runtime import broadcast_from_main
from prism_mcore.stages.context import RunContext


@contextmanager
def rollout_engine(ctx: RunContext, policy_path: str, weight_version: int = 0) -> Iterator[RolloutEngine | None]:
    """The stage's rollout engine (rank 0 only: it generates for everyone; None elsewhere), closed when the block
    ends, however it ends: an SGLang client's request threads, connections and weight-sync process group never
    outlive the stage, so the next stage can open its own (on the same port)."""
    if not ctx.is_main:
        yield None
        return
    device = ctx.env.device if ctx.env.device.type == "cuda" else "cpu"
    engine = build_rollout_engine(
        ctx.config.rollout, policy_path, run_dir=ctx.run_dir, device=device, weight_version=weight_version
    )
    try:
        yield engine
    finally:
        ctx.released_engines.discard(engine)
        engine.close()


def rollout(
    ctx: RunContext, engine: RolloutEngine | None, prompts: list[Sample], params: SamplingParams
) -> list[Sample]:
    """Generate on rank 0, segment the responses (caption/CoT bounds, format validity), score them with the
    verifiable reward (logged in alignment, the reward in RLVR), and share them with every rank."""
    samples = None
    if ctx.is_main:
        with awake(ctx, engine):
            samples = engine.generate(prompts, params)
        ctx.segmenter.segment_samples(samples)
        reward_batch(samples)
    return broadcast_from_main(samples)


@contextmanager
def awake(ctx: RunContext, engine: RolloutEngine, release_after: bool = True) -> Iterator[None]:
    """The rollout engine holds its memory inside the block. With `rollout.offload_during_training` (colocated
    servers share the trainer's GPUs) it resumes its memory on entry when released, and releases it on exit
    unless `release_after` is false (after a weight sync: generation comes next, and releasing freshly loaded
    weights would only copy them to the host and back)."""
    offload = ctx.config.rollout.offload_during_training
    if offload and engine in ctx.released_engines:
        engine.resume_memory()
        ctx.released_engines.discard(engine)
    yield
    if offload and release_after:
        engine.release_memory()
        ctx.released_engines.add(engine)


def sync_weights(ctx: RunContext, policy: Any, engine: RolloutEngine | None, version: int) -> None:
    """Stream the policy's HF weights to the rollout engine; the export is collective, every rank drains it."""

    stream = iter_hf_weights(policy, cpu=False)
    if ctx.is_main:
        stream = weights_for_sync(stream, ctx.config.rollout, ctx.env.device)
        with awake(ctx, engine, release_after=False):
            engine.update_weights(stream, version)
    else:
        for _ in stream:
            pass


def rollout_metrics(samples: list[Sample]) -> dict[str, float]:
    """Response statistics logged by both RL stages (PRISM_SPEC §8.9)."""
    lengths = torch.tensor([float(s.response_length) for s in samples])
    accuracy = torch.tensor([s.accuracy for s in samples])
    return {
        "response_length_mean": lengths.mean().item(),
        "response_length_max": lengths.max().item(),
        "clip_ratio": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "reward/format_valid_ratio": sum(s.format_valid for s in samples) / len(samples),
        "reward/acc_reward/mean": accuracy.mean().item(),
        "reward/acc_reward/max": accuracy.max().item(),
        "reward/acc_reward/min": accuracy.min().item(),
        "reward/format_reward/mean": sum(s.format_reward for s in samples) / len(samples),
    }
