"""Stage 3, RLVR: reinforcement learning with the rule-based verifiable reward (PRISM_SPEC §5, §6).

Every step: sample `rollout.n` responses to each of `rlvr.prompts_per_step` prompts, score them with
R = 0.8 · accuracy + 0.2 · format (0 for an invalid format), optionally shape R with DAPO's overlong penalty, take the
GRPO advantage (R − group mean) / (group std + 1e-6), make one policy step (or `updates_per_rollout` steps on
slices of the batch, `training/updates.py`), and sync the weights to the rollout
engine. GRPO, DAPO and GSPO differ only in the policy-loss preset (`rlvr.policy_loss.preset`) and, for DAPO, in
dynamic sampling: generation batches of `generation_prompts_per_step` prompts are drawn until
`prompts_per_step` groups whose accuracies are not all equal are collected (at most `max_generation_batches`).

Schedule as the released scripts run it: validation before the first step (step 0) and every `eval_every` steps,
sampled as the recipe says (`val_*`); and the stage ends after `max_epochs` passes over the prompts (verl's
`total_epochs`, counted in whole batches, generation batches with dynamic sampling) when that comes before `steps`:
at most 30·⌊N/96⌋ steps for the released DAPO.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from prism_mcore.algorithms import collect_informative_groups, group_ids_from_uids, grpo_advantage, overlong_penalty
from prism_mcore.config.schema import Config
from prism_mcore.data.batching import batch_for_step
from prism_mcore.models import build_discriminator, build_policy, save_hf
from prism_mcore.record import Sample
from prism_mcore.rollout import SamplingParams
from prism_mcore.stages.context import POLICY_HF, finish_stage, input_checkpoint, load_prompts, start_stage
from prism_mcore.stages.drift import latest_discriminator, model_drift, record_drift
from prism_mcore.stages.evaluation import evaluate_splits, periodic_validation, validation, validation_params
from prism_mcore.stages.rollouts import rollout, rollout_engine, rollout_metrics, sync_weights
from prism_mcore.training.forward import policy_forward
from prism_mcore.training.loop import DataExhausted, make_trainable, run_steps
from prism_mcore.training.loss_config import policy_loss_config
from prism_mcore.training.sharding import token_budget
from prism_mcore.training.updates import policy_minibatches, policy_updates

STAGE = "rlvr"


def epoch_batch_cap(num_prompts: int, batch_size: int, max_epochs: int) -> int | None:
    """How many batches of `batch_size` prompts `max_epochs` passes over `num_prompts` give, whole batches only (as
    verl's drop_last loader); None when `max_epochs` is 0 (no cap)."""
    if max_epochs <= 0:
        return None
    if num_prompts < batch_size:
        raise ValueError(
            f"rlvr: {num_prompts} RL prompts are fewer than one batch of {batch_size}, so rlvr.max_epochs="
            f"{max_epochs} allows no step (the reference's loader drops incomplete batches); use more prompts, a "
            "smaller batch, or rlvr.max_epochs=0"
        )
    return max_epochs * (num_prompts // batch_size)


class DynamicSampling:
    """DAPO's dynamic sampling (PRISM_SPEC §5.1): a step draws generation batches until `groups_per_step` prompts
    whose responses' accuracies are not all equal are kept (at most `max_generation_batches` per step).

    How many generation batches a step draws varies, so the position in the prompts is resumable state: the number of
    batches drawn so far (`state_dict`, saved with each step checkpoint). Past `batch_cap` batches (the epoch cap) the
    data is used up and the stage ends (`DataExhausted`).
    """

    def __init__(
        self,
        generate_batch: Callable[[int, int], list[Sample]],
        groups_per_step: int,
        max_generation_batches: int,
        batch_cap: int | None,
    ) -> None:
        self.generate_batch = generate_batch  # (step, generation batch index) -> that batch's samples
        self.groups_per_step = groups_per_step
        self.max_generation_batches = max_generation_batches
        self.batch_cap = batch_cap
        self.generation_batches = 0

    def state_dict(self) -> dict[str, int]:
        return {"generation_batches": self.generation_batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.generation_batches = state.get("generation_batches", 0)

    def next_groups(self, step: int) -> list[list[Sample]]:
        """The next generation batch's samples, one list per prompt."""
        if self.batch_cap is not None and self.generation_batches >= self.batch_cap:
            raise DataExhausted(f"{self.batch_cap} generation batches drawn, the epoch cap (rlvr.max_epochs)")
        self.generation_batches += 1
        groups: dict[str, list[Sample]] = {}
        for sample in self.generate_batch(step, self.generation_batches - 1):
            groups.setdefault(sample.uid, []).append(sample)
        return list(groups.values())

    def step_samples(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """The kept groups' samples of step `step` and the `dynamic_sampling/*` metrics."""
        result = collect_informative_groups(
            lambda: self.next_groups(step),
            lambda sample: sample.accuracy,
            self.groups_per_step,
            max_generation_batches=self.max_generation_batches,
        )
        kept = [sample for group in result.groups for sample in group]
        return kept, {
            "dynamic_sampling/generation_batches": result.num_generation_batches,
            "dynamic_sampling/kept_ratio": len(result.groups) / result.num_generated_groups,
        }


def run(config: Config) -> None:
    ctx = start_stage(config, STAGE)
    if ctx is None:
        return

    cfg = config.rlvr
    prompts = load_prompts(ctx, config.data.rl_path, "rlvr", require_teacher=False)
    policy_path = input_checkpoint(ctx, STAGE, POLICY_HF)
    policy = make_trainable(
        build_policy(config.model, config.parallel, path=policy_path),
        cfg.optim,
        cfg.steps * cfg.updates_per_rollout,  # the schedule counts optimizer steps
        config.parallel,
        offload_when_idle=cfg.offload_idle_states,
    )
    policy_step = policy_forward(
        policy_loss_config(cfg.policy_loss, config.rollout.tis_cap), config.rollout.temperature
    )
    batch_size = cfg.generation_prompts_per_step if cfg.dynamic_sampling else cfg.prompts_per_step
    batch_cap = epoch_batch_cap(len(prompts), batch_size, cfg.max_epochs)
    # Without dynamic sampling a step is one batch; the schedule still spans `steps` (verl's total_training_steps).
    total_steps = cfg.steps if batch_cap is None or cfg.dynamic_sampling else min(cfg.steps, batch_cap)
    val_params = validation_params(cfg, seed=config.run.seed)

    def drift() -> dict[str, float]:
        return model_drift(ctx, policy.handle)

    budget = token_budget(config.data, cfg.max_tokens_per_microbatch)

    def generate(step: int, prompt_batch: int, batch_size: int) -> list[Sample]:
        params = dataclasses.replace(
            SamplingParams.from_config(config.rollout, seed=config.run.seed + 7919 * step + prompt_batch),
            max_new_tokens=cfg.max_new_tokens,
        )
        return rollout(ctx, engine, batch_for_step(prompts, prompt_batch, batch_size, config.run.seed), params)

    sampling = None
    if cfg.dynamic_sampling:
        sampling = DynamicSampling(
            lambda step, index: generate(step, index, cfg.generation_prompts_per_step),
            cfg.prompts_per_step,
            cfg.max_generation_batches,
            batch_cap,
        )

    def step_fn(step: int) -> dict[str, float]:
        if sampling is None:
            samples, sampling_metrics = generate(step, step, cfg.prompts_per_step), {}
        else:
            samples, sampling_metrics = sampling.step_samples(step)
        rewards = torch.tensor([s.reward for s in samples])
        if cfg.overlong_buffer > 0:
            rewards = rewards + overlong_penalty(
                torch.tensor([s.response_length for s in samples]),
                max_response_length=cfg.max_new_tokens,
                buffer_length=cfg.overlong_buffer,
                penalty_factor=cfg.overlong_penalty_factor,
            )
        advantages = grpo_advantage(rewards, group_ids_from_uids([s.uid for s in samples]))
        for sample, reward, advantage in zip(samples, rewards.tolist(), advantages.tolist(), strict=True):
            sample.reward, sample.advantage = reward, advantage
        minibatches = policy_minibatches(ctx.builder, ctx.env, samples, budget, cfg.updates_per_rollout)
        result = policy_updates(policy, policy_step, minibatches, config.rollout.temperature)
        sync_weights(ctx, policy.handle, engine, version=step + 1)
        return {
            **periodic_validation(ctx, engine, step, cfg.eval_every, val_params, drift),
            **rollout_metrics(samples),
            **sampling_metrics,
            "reward/mean": rewards.mean().item(),
            **{f"actor/{k}": v for k, v in result.metrics.items()},
            "actor/grad_norm": result.grad_norm,
            "actor/lr": result.lr,
            "actor/skipped": float(result.skipped),
            "skipped": float(result.skipped),  # as every stage logs it
        }

    # One engine for the stage, closed however the stage ends (`step_fn` samples from it).
    with rollout_engine(ctx, policy_path) as engine:
        steps_done = run_steps(
            ctx,
            STAGE,
            {"policy": policy},
            total_steps,
            cfg.save_every,
            step_fn,
            log_keys=("reward/mean", "reward/acc_reward/mean", "reward/format_valid_ratio", "actor/pg_loss"),
            state=sampling,
            on_resume=lambda step: sync_weights(ctx, policy.handle, engine, version=step),
            before_training=(lambda: validation(ctx, engine, val_params, drift)) if cfg.val_before_train else None,
        )
        record = {"steps": steps_done, "eval": evaluate_splits(ctx, engine, val_params)}
    # The score gap needs a discriminator: the latest one this run exported, loaded for this measurement only.
    latest = latest_discriminator(ctx, STAGE)
    discriminator, which_d = None, "none (no stage of this run trained one)"
    if latest is not None:
        discriminator = build_discriminator(config.model, config.parallel, path=latest[1])
        which_d = f"the {latest[0]} stage's export"
    record_drift(ctx, STAGE, record, policy.handle, discriminator, which_d)
    record[POLICY_HF] = str(save_hf(policy.handle, ctx.run_path("hf", STAGE)))
    finish_stage(ctx, STAGE, record)
