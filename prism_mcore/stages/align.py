"""Stage 2, PRISM alignment: a black-box, response-level adversarial game against a Qwen3-VL-MoE discriminator
(PRISM_SPEC §3, §4).

Every step, in the reference's order (§3.2):
1. rollout: `rollout.n` responses to each of `align.prompts_per_step` prompts, segmented into caption and CoT;
2. D scores each response's caption and CoT (eval mode; the image and the prompt in context, real MRoPE positions,
   the score read at the segment's last token, clipped to ±10, invalid formats scored 0);
3. the alignment advantage from these pre-update scores: invalid samples take their group's valid minimum − 1,
   caption and CoT scores are group-normalised, weighted 0.5/0.5, and invalid formats pay 1.5 (released mode);
4. one D step: pairwise Bradley-Terry (teacher vs student, caption and CoT) + 0.001 · L2, no router aux loss;
5. one policy step: PPO clip 0.2, dual clip 3, token-mean, no KL;
6. weight sync to the rollout engine.
No teacher logits are needed: the teacher enters only through its demonstrations, which D compares against.

Steps 2 and 4 are one pass of D: the update's forward scores every student segment before the optimizer step, and
the value head read without its dropout on those hidden states gives the eval-mode scores of step 2 (the backbone
has no dropout; equal up to the float rounding of a different packing); only the advantage waits for them. D's
micro-batches keep a prompt's samples together, and every micro-batch carries each distinct image once
(`pack_sequences(share_images=True)`): the vision tower encodes it once per micro-batch.
"""

from __future__ import annotations

import dataclasses

import torch
from prism_kernels.alignment_advantage import fused_alignment_advantage

from prism_mcore.algorithms import (
    AlignmentAdvantageConfig,
    DiscriminatorLossConfig,
    group_ids_from_uids,
    sanitize_scores,
)
from prism_mcore.config.schema import Config
from prism_mcore.data.batching import pack_sequences, step_image_count
from prism_mcore.models import build_discriminator, build_policy, save_hf
from prism_mcore.record import Sample
from prism_mcore.rollout import SamplingParams
from prism_mcore.runtime import broadcast_from_last_stage, gather_data_parallel
from prism_mcore.stages.common import (
    DISCRIMINATOR_HF,
    POLICY_HF,
    RunContext,
    batch_for_step,
    dp_share,
    evaluate_splits,
    finish_stage,
    input_checkpoint,
    load_prompts,
    make_engine,
    make_trainable,
    or_filler,
    periodic_validation,
    policy_loss_config,
    policy_microbatches,
    rollout,
    rollout_metrics,
    run_steps,
    start_stage,
    sync_weights,
    token_budget,
    validation,
    validation_params,
)
from prism_mcore.training.forward import DiscriminatorBatch, discriminator_forward, policy_forward
from prism_mcore.training.step import Filler, StepResult

STAGE = "align"


def discriminator_microbatches(ctx: RunContext, samples: list[Sample], budget: int) -> list[DiscriminatorBatch]:
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
            teachers[sample.uid] = ctx.builder.teacher_segments(sample)
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
    for sample in dp_share(ctx, samples):
        students = ctx.builder.student_segments(sample)
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
    shares = gather_data_parallel(valid) if ctx.env.dp > 1 else [valid]
    totals = [sum(share[i] for share in shares if i < len(share)) for i in range(len(batches))]
    batches = [dataclasses.replace(b, num_valid_global=n) for b, n in zip(batches, totals, strict=True)]
    return or_filler(batches, lambda: batch([(samples[0], ctx.builder.student_segments(samples[0]))]))


class RolloutScores:
    """The students' eval-mode caption and CoT scores, collected from D's update forward (`discriminator_forward`'s
    `on_scores`) on each rank's share, then shared with every rank."""

    def __init__(self) -> None:
        self.mine: dict[int, tuple[float, float]] = {}

    def __call__(self, sample_index: torch.Tensor, caption: torch.Tensor, cot: torch.Tensor) -> None:
        for index, caption_score, cot_score in zip(sample_index.tolist(), caption.tolist(), cot.tolist(), strict=True):
            if index >= 0:
                self.mine[index] = (caption_score, cot_score)

    def assign(self, ctx: RunContext, samples: list[Sample], score_clip: float) -> None:
        """Fill `caption_score`/`cot_score` with D's clipped scores; 0 for invalid formats (PRISM_SPEC §2.4, §1)."""
        scores = torch.zeros(len(samples), 2)
        mine = broadcast_from_last_stage(self.mine)
        for share in gather_data_parallel(mine) if ctx.env.dp > 1 else [mine]:
            for index, pair in share.items():
                scores[index] = torch.tensor(pair)
        scores = sanitize_scores(scores, clip=score_clip)
        for sample, (caption, cot) in zip(samples, scores.tolist(), strict=True):
            sample.caption_score, sample.cot_score = (caption, cot) if sample.format_valid else (0.0, 0.0)


def work_counters(
    ctx: RunContext, d_batches: list, d_result: StepResult, p_batches: list, p_result: StepResult
) -> dict[str, float]:
    """What the step computed, summed over the data-parallel ranks (`work/*`): images through the vision tower
    (policy and D; each distinct image once per model and rank, `data.batching.step_image_count`), D's packed sequences and tokens, teacher segments packed, filler micro-batches, and the share of
    the policy's tokens that carry a loss (the only positions projected onto the vocabulary)."""
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
    total = sum(gather_data_parallel(mine)) if ctx.env.dp > 1 else mine
    names = ("vision_images", "d_sequences", "d_tokens", "teacher_segments", "filler_microbatches")
    counters = {f"work/{name}": float(value) for name, value in zip(names, total.tolist(), strict=False)}
    counters["work/policy_loss_token_fraction"] = float(total[5] / total[6]) if total[6] else 0.0
    return counters


def run(config: Config) -> None:
    ctx = start_stage(config, STAGE)
    if ctx is None:
        return

    cfg = config.align
    prompts = load_prompts(ctx, config.data.align_path, "align", require_teacher=True)
    policy_path = input_checkpoint(ctx, STAGE, POLICY_HF)
    policy = make_trainable(
        ctx,
        build_policy(config.model, config.parallel, path=policy_path),
        cfg.policy_optim,
        cfg.steps,
        offload_when_idle=cfg.offload_idle_states,
    )
    discriminator = make_trainable(
        ctx,
        build_discriminator(
            config.model, config.parallel, path=input_checkpoint(ctx, STAGE, DISCRIMINATOR_HF), seed=config.run.seed
        ),
        cfg.discriminator_optim,
        cfg.steps,
        offload_when_idle=cfg.offload_idle_states,
    )
    engine = make_engine(ctx, policy_path)
    budget = token_budget(ctx, cfg.max_tokens_per_microbatch)
    advantage_config = AlignmentAdvantageConfig(
        mode=cfg.advantage_mode,
        caption_weight=cfg.caption_weight,
        cot_weight=cfg.cot_weight,
        format_penalty=cfg.format_penalty,
    )
    d_loss_config = DiscriminatorLossConfig(score_clip=cfg.score_clip, score_reg_coef=cfg.score_reg_coef)
    policy_step = policy_forward(
        policy_loss_config(cfg.policy_loss, config.rollout.tis_cap), config.rollout.temperature
    )
    val_params = validation_params(cfg, seed=config.run.seed)

    def step_fn(step: int) -> dict[str, float]:
        params = dataclasses.replace(
            SamplingParams.from_config(config.rollout, seed=config.run.seed + step), max_new_tokens=cfg.max_new_tokens
        )
        samples = rollout(ctx, engine, batch_for_step(prompts, step, cfg.prompts_per_step, config.run.seed), params)
        d_batches = discriminator_microbatches(ctx, samples, budget)
        scores = RolloutScores()
        d_result = discriminator.step(discriminator_forward(d_loss_config, on_scores=scores), d_batches)
        scores.assign(ctx, samples, cfg.score_clip)
        device = ctx.env.device  # the Triton kernel on a GPU, its torch reference on CPU
        advantages = fused_alignment_advantage(
            torch.tensor([s.caption_score for s in samples], device=device),
            torch.tensor([s.cot_score for s in samples], device=device),
            torch.tensor([s.format_valid for s in samples], device=device),
            group_ids_from_uids([s.uid for s in samples]).to(device),
            accuracy=torch.tensor([s.accuracy for s in samples], device=device),
            format_reward=torch.tensor([s.format_reward for s in samples], device=device),
            config=advantage_config,
        ).cpu()
        for sample, advantage in zip(samples, advantages.tolist(), strict=True):
            sample.advantage = advantage
        p_batches = policy_microbatches(ctx, samples, budget)
        p_result = policy.step(policy_step, p_batches)
        sync_weights(ctx, policy.handle, engine, version=step + 1)
        caption = torch.tensor([s.caption_score for s in samples if s.format_valid] or [0.0])
        cot = torch.tensor([s.cot_score for s in samples if s.format_valid] or [0.0])
        return {
            **periodic_validation(ctx, engine, step, cfg.eval_every, val_params),
            **rollout_metrics(samples),
            "reward/caption_score_mean": caption.mean().item(),
            "reward/caption_score_std": caption.std(correction=0).item(),
            "reward/cot_score_mean": cot.mean().item(),
            "reward/cot_score_std": cot.std(correction=0).item(),
            "reward/format_scores_mean": sum(s.format_valid for s in samples) / len(samples),
            "advantage_mean": advantages.mean().item(),
            **{f"critic/{k}": v for k, v in d_result.metrics.items()},
            "critic/grad_norm": d_result.grad_norm,
            "critic/lr": d_result.lr,
            "critic/skipped": float(d_result.skipped),
            **{f"actor/{k}": v for k, v in p_result.metrics.items()},
            "actor/grad_norm": p_result.grad_norm,
            "actor/lr": p_result.lr,
            "actor/skipped": float(p_result.skipped),
            **work_counters(ctx, d_batches, d_result, p_batches, p_result),
        }

    run_steps(
        ctx,
        STAGE,
        {"policy": policy, "discriminator": discriminator},
        cfg.steps,
        cfg.save_every,
        step_fn,
        log_keys=(
            "reward/caption_score_mean",
            "reward/cot_score_mean",
            "reward/format_valid_ratio",
            "critic/d_acc",
            "critic/d_loss",
            "actor/pg_loss",
        ),
        on_resume=lambda step: sync_weights(ctx, policy.handle, engine, version=step),
        before_training=(lambda: validation(ctx, engine, val_params)) if cfg.val_before_train else None,
    )
    record = {"steps": cfg.steps, "eval": evaluate_splits(ctx, engine, val_params)}
    record[POLICY_HF] = str(save_hf(policy.handle, ctx.stage_dir("hf", STAGE)))
    record[DISCRIMINATOR_HF] = str(save_hf(discriminator.handle, ctx.stage_dir("hf", "align_discriminator")))
    finish_stage(ctx, STAGE, record)
