"""Each data-parallel rank's share of a step's batch, as the micro-batches of each model's train step.

Every rank holds the whole batch (rollouts run on rank 0 and are shared); `dp_share` gives this rank a contiguous
slice, and each builder below packs it into micro-batches within a token budget. A rank whose share is empty still
joins every step with one `Filler` micro-batch (no loss, no gradient), so the collectives of the step line up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from prism_mcore.config.schema import DataConfig
from prism_mcore.data.batching import PackedBatch, pack_sequences, step_image_count, token_budget_batches
from prism_mcore.data.samples import SampleBuilder, SegmentPair, TokenSequence
from prism_mcore.record import Sample
from prism_mcore.runtime import DistEnv, gather_data_parallel
from prism_mcore.training.forward import DiscriminatorBatch, TokenBatch, token_batch
from prism_mcore.training.step import Filler, StepResult


def dp_share(env: DistEnv, items: list) -> list:
    """This data-parallel rank's share of a batch that every rank holds: a contiguous slice (so the samples of a
    prompt mostly stay together), shares differing in size by at most one. May be empty when items < ranks."""
    base, extra = divmod(len(items), env.dp)
    rank = env.dp_rank
    start = rank * base + min(rank, extra)
    return items[start : start + base + (rank < extra)]


def or_filler(batches: list, build: Callable[[], Any]) -> list:
    """`batches`, or a single (tiny) `Filler` shaped like `build()` when this rank's share is empty: every rank joins
    each step."""
    return batches if batches else [Filler.of(build())]


def token_budget(data: DataConfig, stage_budget: int = 0) -> int:
    """Tokens per micro-batch: the stage's own budget when set, else `data.max_tokens_per_microbatch`."""
    return stage_budget or data.max_tokens_per_microbatch


def sft_microbatches(env: DistEnv, sequences: list[TokenSequence], budget: int) -> list[TokenBatch]:
    """This rank's share of a global batch of conversations, packed into micro-batches of at most `budget` tokens."""
    mine = dp_share(env, sequences)
    groups = token_budget_batches([len(s) for s in mine], budget)
    batches = [token_batch(pack_sequences([mine[i] for i in group])) for group in groups]
    return or_filler(batches, lambda: token_batch(pack_sequences(sequences[:1])))


def pair_microbatches(env: DistEnv, pairs: list[SegmentPair], budget: int) -> list[PackedBatch]:
    """Token-budget micro-batches of this rank's warmup pairs, each packing its teachers then its students."""

    def batch(chosen: list[SegmentPair]) -> PackedBatch:
        return pack_sequences([pair.teacher for pair in chosen] + [pair.student for pair in chosen])

    mine = dp_share(env, pairs)
    groups = token_budget_batches([len(pair.teacher) + len(pair.student) for pair in mine], budget)
    return or_filler([batch([mine[i] for i in group]) for group in groups], lambda: batch(pairs[:1]))


def policy_microbatches(builder: SampleBuilder, env: DistEnv, samples: list[Sample], budget: int) -> list:
    """This rank's rollouts as packed policy micro-batches of at most `budget` tokens, with advantages and rollout
    log-probs."""

    def batch(chosen: list[Sample]) -> Any:
        return token_batch(
            pack_sequences([builder.policy_sequence(sample) for sample in chosen], share_images=True),
            advantages=[sample.advantage for sample in chosen],
            rollout_logprobs=[sample.rollout_logprobs for sample in chosen],
        )

    mine = dp_share(env, samples)
    lengths = [len(sample.prompt_ids) + sample.response_length for sample in mine]
    groups = token_budget_batches(lengths, budget)
    return or_filler([batch([mine[i] for i in group]) for group in groups], lambda: batch(samples[:1]))


def discriminator_microbatches(
    builder: SampleBuilder, env: DistEnv, samples: list[Sample], budget: int
) -> list[DiscriminatorBatch]:
    """This rank's share of the samples as D micro-batches of at most `budget` tokens.

    The share is a contiguous slice in group order, so the samples of a prompt mostly share a micro-batch, and its
    teacher segments and its image are packed (scored, encoded) once per micro-batch rather than once per sample.
    `sample_index` maps each student to its place in `samples`, for the scores the update forward hands back. A
    sample whose four segments alone exceed the budget gets a micro-batch of its own (a sample cannot be split: its
    loss pairs its scores with its teacher's). `num_valid_global` is N_v of PRISM_SPEC §3.1: the valid samples of the
    micro-batch summed over the data-parallel ranks' micro-batches of the same index.
    """
    teachers: dict[str, tuple] = {}

    def teacher(sample: Sample) -> tuple:
        if sample.uid not in teachers:
            teachers[sample.uid] = builder.teacher_segments(sample)
        return teachers[sample.uid]

    position = {id(sample): i for i, sample in enumerate(samples)}

    def batch(chosen: list[tuple[Sample, tuple]]) -> DiscriminatorBatch:
        """A micro-batch of (sample, its student segments) pairs and their prompts' teacher segments."""
        prompts: dict[str, Sample] = {}  # uid -> the prompt's first sample, in order of appearance
        for sample, _ in chosen:
            prompts.setdefault(sample.uid, sample)
        index = {uid: i for i, uid in enumerate(prompts)}
        students = [segments for _, segments in chosen]
        teacher_pairs = [teacher(first) for first in prompts.values()]
        sequences = [c for c, _ in students] + [t for _, t in students]
        sequences += [c for c, _ in teacher_pairs] + [t for _, t in teacher_pairs]
        return DiscriminatorBatch(
            packed=pack_sequences(sequences, share_images=True),
            valid=torch.tensor([sample.format_valid for sample, _ in chosen]),
            teacher_index=torch.tensor([index[sample.uid] for sample, _ in chosen]),
            num_prompts=len(prompts),
            num_valid_global=0,
            sample_index=torch.tensor([position[id(sample)] for sample, _ in chosen]),
        )

    groups: list[list[tuple[Sample, tuple]]] = []
    cost, seen = 0, set()
    for sample in dp_share(env, samples):
        students = builder.student_segments(sample)
        student_cost = sum(len(segment) for segment in students)
        teacher_cost = sum(len(segment) for segment in teacher(sample))
        sample_cost = student_cost + (0 if sample.uid in seen else teacher_cost)
        if not groups or cost + sample_cost > budget:
            groups.append([])
            cost, seen = 0, set()
            sample_cost = student_cost + teacher_cost
        groups[-1].append((sample, students))
        seen.add(sample.uid)
        cost += sample_cost
    batches = [batch(group) for group in groups]
    valid = [int(b.valid.sum()) for b in batches]
    shares = gather_data_parallel(valid) if env.dp > 1 else [valid]
    totals = [sum(share[i] for share in shares if i < len(share)) for i in range(len(batches))]
    batches = [dataclasses.replace(b, num_valid_global=n) for b, n in zip(batches, totals, strict=True)]
    return or_filler(batches, lambda: batch([(samples[0], builder.student_segments(samples[0]))]))


def work_counters(
    env: DistEnv, d_batches: list, d_result: StepResult, p_batches: list, p_result: StepResult
) -> dict[str, float]:
    """What the step computed, summed over the data-parallel ranks (`work/*`): images through the vision tower
    (policy and D: each distinct image once per model and rank, `data.batching.step_image_count`), D's packed
    sequences and tokens, teacher segments packed, filler micro-batches, and the share of the policy's tokens that
    carry a loss (the only positions projected onto the vocabulary)."""
    d_real = [batch for batch in d_batches if not isinstance(batch, Filler)]
    p_real = [batch for batch in p_batches if not isinstance(batch, Filler)]
    mine = torch.tensor(
        [
            step_image_count([batch.packed for batch in d_real]) + step_image_count([batch.packed for batch in p_real]),
            sum(batch.packed.num_sequences for batch in d_real),
            sum(batch.packed.num_tokens for batch in d_real),
            sum(2 * batch.num_prompts for batch in d_real),
            d_result.filler_microbatches + p_result.filler_microbatches,
            sum(int(batch.loss_mask.sum()) for batch in p_real),
            sum(batch.packed.num_tokens for batch in p_real),
        ],
        dtype=torch.float64,
    )
    total = sum(gather_data_parallel(mine)) if env.dp > 1 else mine
    names = ("vision_images", "d_sequences", "d_tokens", "teacher_segments", "filler_microbatches")
    counters = {f"work/{name}": float(value) for name, value in zip(names, total.tolist(), strict=False)}
    counters["work/policy_loss_token_fraction"] = float(total[5] / total[6]) if total[6] else 0.0
    return counters
