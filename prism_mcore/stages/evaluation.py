"""Evaluation for the stages: accuracy, format-valid rate and reward with the verifiable reward on the validation and
test prompts (rank 0 generates; every rank gets the result), at a stage's end, before its first step and every
`eval_every` steps."""

from __future__ import annotations

import time
from typing import Any

from prism_mcore.data.samples import PromptSet
from prism_mcore.rewards import reward_batch
from prism_mcore.rollout import RolloutEngine, SamplingParams
from prism_mcore.runtime import broadcast_from_main
from prism_mcore.stages.context import RunContext, load_prompts, log
from prism_mcore.stages.rollouts import awake

EVAL_WAVE = 1024  # evaluation prompts per generate call


def validation_params(stage: Any, seed: int) -> SamplingParams:
    """An RL stage's validation sampling: its `val_temperature`, `val_top_p` and `val_max_new_tokens` (0: the
    stage's `max_new_tokens`), one response per prompt; greedy unless the recipe samples (released DAPO, GSPO)."""
    return SamplingParams(
        n=1,
        temperature=stage.val_temperature,
        top_p=stage.val_top_p,
        max_new_tokens=stage.val_max_new_tokens or stage.max_new_tokens,
        seed=seed,
    )


def evaluate(
    ctx: RunContext,
    engine: RolloutEngine | None,
    prompts: PromptSet,
    split: str,
    params: SamplingParams | None = None,
) -> dict[str, float]:
    """Accuracy, format-valid rate and reward with the verifiable reward (rank 0 generates; shared with all), sampled
    with `params` (default: greedy, up to `rollout.max_new_tokens`)."""
    result = None
    if ctx.is_main:
        start = time.time()
        if params is None:
            params = SamplingParams(n=1, temperature=0.0, max_new_tokens=ctx.config.rollout.max_new_tokens)
        samples = []
        with awake(ctx, engine):
            # Few large calls: an SGLang engine keeps every prompt of a call in flight and the local engine batches
            # by its own size, while only one wave of prompts is built at a time (the split may be large).
            for first in range(0, len(prompts), EVAL_WAVE):
                samples += engine.generate(prompts[first : first + EVAL_WAVE], params)
        ctx.segmenter.segment_samples(samples)
        reward_batch(samples)
        result = {
            "accuracy": sum(s.accuracy for s in samples) / len(samples),
            "format_valid": sum(s.format_valid for s in samples) / len(samples),
            "reward": sum(s.reward for s in samples) / len(samples),
            "num_prompts": len(samples),
        }
        log.info(
            "eval %s: accuracy %.3f, format-valid %.3f (%d prompts, %.1fs)",
            split,
            result["accuracy"],
            result["format_valid"],
            len(samples),
            time.time() - start,
        )
    return broadcast_from_main(result)


def evaluate_splits(
    ctx: RunContext, engine: RolloutEngine | None, params: SamplingParams | None = None
) -> dict[str, dict[str, float]]:
    return {split: evaluate(ctx, engine, eval_prompts(ctx, split), split, params) for split in ("val", "test")}


def eval_prompts(ctx: RunContext, split: str) -> PromptSet:
    """The first `data.max_eval_prompts` prompts of the `val` or `test` split (validated once per run)."""
    if split not in ctx.eval_prompts:
        path = ctx.config.data.val_path if split == "val" else ctx.config.data.test_path
        prompts = load_prompts(ctx, path, split, require_teacher=False)
        ctx.eval_prompts[split] = prompts.head(ctx.config.data.max_eval_prompts)
    return ctx.eval_prompts[split]


def periodic_validation(
    ctx: RunContext, engine: RolloutEngine | None, step: int, every: int, params: SamplingParams | None = None
) -> dict[str, float]:
    """Accuracy and format-valid rate on the validation split after every `every`-th step (`val/*`)."""
    if not every or (step + 1) % every:
        return {}
    return validation(ctx, engine, params)


def validation(ctx: RunContext, engine: RolloutEngine | None, params: SamplingParams | None) -> dict[str, float]:
    """The validation split's `val/*` metrics now (e.g. before training: `val_before_train`)."""
    result = evaluate(ctx, engine, eval_prompts(ctx, "val"), "val", params)
    return {f"val/{name}": value for name, value in result.items() if name != "num_prompts"}
