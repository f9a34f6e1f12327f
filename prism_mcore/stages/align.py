"""Stage 2, PRISM alignment: a black-box, response-level adversarial game against a Qwen3-VL-MoE discriminator
(PRISM_SPEC §3, §4).

Every step, in the reference's order (§3.2):
1. rollout: `rollout.n` responses to each of `align.prompts_per_step` prompts, segmented into caption and CoT;
2. D scores each response's caption and CoT (eval mode; the image and the prompt in context, real MRoPE positions,
   the score read at the segment's last token, clipped to ±10, invalid formats scored 0);
3. the alignment advantage from these pre-update scores: invalid samples take their group's valid minimum − 1,
   caption and CoT scores are group-normalised, weighted 0.5/0.5, and invalid formats pay 1.5 (released mode);
4. one D step: pairwise Bradley-Terry (teacher vs student, caption and CoT) + 0.001 · L2, no router aux loss;
5. one policy step: PPO clip 0.2, dual clip 3, token-mean, no KL (`updates_per_rollout` > 1 splits the batch into
   that many steps against the pre-update log-probs, `training/updates.py`; D still takes one step);
6. weight sync to the rollout engine.
No teacher logits are needed: the teacher enters only through its demonstrations, which D compares against.

Steps 2 and 4 are one pass of D: the update's forward scores every student segment before the optimizer step, and
the value head read without its dropout on those hidden states gives the eval-mode scores of step 2 (the backbone
has no dropout; equal up to the float rounding of a different packing); only the advantage waits for them. D's
micro-batches keep a prompt's samples together, and every micro-batch carries each distinct image once
(`pack_sequences(share_images=True)`); over the micro-batches of a step the vision tower encodes each distinct image
once per model and rank (`models.step_images`, inside `training.step`).
"""

from __future__ import annotations

import dataclasses

import torch

from prism_mcore.algorithms import AlignmentAdvantageConfig, DiscriminatorLossConfig
from prism_mcore.config.schema import Config
from prism_mcore.data.batching import batch_for_step
from prism_mcore.data.samples import SampleBuilder
from prism_mcore.models import build_discriminator, build_policy, save_hf
from prism_mcore.record import Sample
from prism_mcore.rollout import SamplingParams
from prism_mcore.runtime import DistEnv
from prism_mcore.stages.context import (
    DISCRIMINATOR_HF,
    POLICY_HF,
    finish_stage,
    input_checkpoint,
    load_prompts,
    start_stage,
)
from prism_mcore.stages.drift import model_drift, record_drift
from prism_mcore.stages.evaluation import evaluate_splits, periodic_validation, validation, validation_params
from prism_mcore.stages.rollouts import rollout, rollout_engine, rollout_metrics, sync_weights
from prism_mcore.training.forward import discriminator_forward, policy_forward
from prism_mcore.training.loop import Trainable, make_trainable, run_steps
from prism_mcore.training.loss_config import policy_loss_config
from prism_mcore.training.scoring import RolloutScores, alignment_advantages
from prism_mcore.training.sharding import (
    discriminator_microbatches,
    token_budget,
    work_counters,
)
from prism_mcore.training.step import ForwardStep, StepResult
from prism_mcore.training.updates import policy_minibatches, policy_updates

STAGE = "align"


def discriminator_phase(
    builder: SampleBuilder,
    env: DistEnv,
    discriminator: Trainable,
    samples: list[Sample],
    budget: int,
    loss_config: DiscriminatorLossConfig,
) -> tuple[list, StepResult]:
    """Steps 2 and 4: this rank's D micro-batches, one D step whose forward also scores every student (eval mode,
    before the update), and those scores, clipped, set on `samples` on every rank. Returns the micro-batches and
    the step's result."""
    d_batches = discriminator_microbatches(builder, env, samples, budget)
    scores = RolloutScores()
    d_result = discriminator.step(discriminator_forward(loss_config, on_scores=scores), d_batches)
    scores.assign(env, samples, loss_config.score_clip)
    return d_batches, d_result


def policy_phase(
    builder: SampleBuilder,
    env: DistEnv,
    policy: Trainable,
    policy_step: ForwardStep,
    samples: list[Sample],
    advantage_config: AlignmentAdvantageConfig,
    budget: int,
    updates: int = 1,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, list, StepResult]:
    """Steps 3 and 5: each sample's alignment advantage from its pre-update scores, then the policy update: one
    optimizer step (released), or `updates` steps over as many mini-batches against the log-probs before the first
    (`training.updates`, sampled at `temperature`). Returns the advantages, this rank's micro-batches (all
    mini-batches') and the update's result."""
    advantages = alignment_advantages(samples, advantage_config, env)
    for sample, advantage in zip(samples, advantages.tolist(), strict=True):
        sample.advantage = advantage
    minibatches = policy_minibatches(builder, env, samples, budget, updates)
    result = policy_updates(policy, policy_step, minibatches, temperature)
    return advantages, [batch for microbatches in minibatches for batch in microbatches], result


def run(config: Config) -> None:
    ctx = start_stage(config, STAGE)
    if ctx is None:
        return

    cfg = config.align
    prompts = load_prompts(ctx, config.data.align_path, "align", require_teacher=True)
    policy_path = input_checkpoint(ctx, STAGE, POLICY_HF)
    policy = make_trainable(
        build_policy(config.model, config.parallel, path=policy_path),
        cfg.policy_optim,
        cfg.steps * cfg.updates_per_rollout,  # the schedule counts optimizer steps
        config.parallel,
        offload_when_idle=cfg.offload_idle_states,
    )
    discriminator = make_trainable(
        build_discriminator(
            config.model, config.parallel, path=input_checkpoint(ctx, STAGE, DISCRIMINATOR_HF), seed=config.run.seed
        ),
        cfg.discriminator_optim,
        cfg.steps,
        config.parallel,
        offload_when_idle=cfg.offload_idle_states,
    )
    budget = token_budget(config.data, cfg.max_tokens_per_microbatch)
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

    def drift() -> dict[str, float]:
        return model_drift(ctx, policy.handle, discriminator.handle)

    def step_fn(step: int) -> dict[str, float]:
        params = dataclasses.replace(
            SamplingParams.from_config(config.rollout, seed=config.run.seed + step), max_new_tokens=cfg.max_new_tokens
        )
        samples = rollout(ctx, engine, batch_for_step(prompts, step, cfg.prompts_per_step, config.run.seed), params)
        d_batches, d_result = discriminator_phase(ctx.builder, ctx.env, discriminator, samples, budget, d_loss_config)
        advantages, p_batches, p_result = policy_phase(
            ctx.builder,
            ctx.env,
            policy,
            policy_step,
            samples,
            advantage_config,
            budget,
            cfg.updates_per_rollout,
            config.rollout.temperature,
        )
        sync_weights(ctx, policy.handle, engine, version=step + 1)
        caption = torch.tensor([s.caption_score for s in samples if s.format_valid] or [0.0])
        cot = torch.tensor([s.cot_score for s in samples if s.format_valid] or [0.0])
        return {
            **periodic_validation(ctx, engine, step, cfg.eval_every, val_params, drift),
            **rollout_metrics(samples),
            "reward/caption_score_mean": caption.mean().item(),
            "reward/caption_score_std": caption.std(correction=0).item(),
            "reward/cot_score_mean": cot.mean().item(),
            "reward/cot_score_std": cot.std(correction=0).item(),
            "advantage_mean": advantages.mean().item(),
            **{f"critic/{k}": v for k, v in d_result.metrics.items()},
            "critic/grad_norm": d_result.grad_norm,
            "critic/lr": d_result.lr,
            "critic/skipped": float(d_result.skipped),
            **{f"actor/{k}": v for k, v in p_result.metrics.items()},
            "actor/grad_norm": p_result.grad_norm,
            "actor/lr": p_result.lr,
            "actor/skipped": float(p_result.skipped),
            "skipped": float(d_result.skipped or p_result.skipped),  # as every stage logs it
            **work_counters(ctx.env, d_batches, d_result, p_batches, p_result),
        }

    # One engine for the stage, closed however the stage ends (`step_fn` samples from it).
    with rollout_engine(ctx, policy_path) as engine:
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
            before_training=(lambda: validation(ctx, engine, val_params, drift)) if cfg.val_before_train else None,
        )
        record = {"steps": cfg.steps, "eval": evaluate_splits(ctx, engine, val_params)}
    record_drift(ctx, STAGE, record, policy.handle, discriminator.handle, "align (the one this stage trained)")
    record[POLICY_HF] = str(save_hf(policy.handle, ctx.run_path("hf", STAGE)))
    record[DISCRIMINATOR_HF] = str(save_hf(discriminator.handle, ctx.run_path("hf", "align_discriminator")))
    finish_stage(ctx, STAGE, record)
