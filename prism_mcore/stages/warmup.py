"""Discriminator warmup: teach the upcycled Qwen3-VL-MoE discriminator to tell teacher from student segments
before the adversarial game starts (PRISM_SPEC §2.5).

Pairs come from the pairwise warmup file (teacher vs student caption, teacher vs student CoT) and, with
`warmup.self_play_pairs > 0`, from the SFT policy's own samples on alignment prompts set against those prompts'
teacher demonstrations: the distribution the discriminator will actually face in stage 2. Each step minimises
mean[-log σ(s_teacher − s_student)] + 0.01 · aux (the router load-balancing loss) over a batch of pairs; a held-out
slice reports the pairwise accuracy mean(s_teacher > s_student) before and after training.

Released setting: AdamW lr 1e-5, cosine with 10% warmup, 1 epoch, 128 pairs per step, images with long side <= 560.
"""

from __future__ import annotations

import dataclasses
import json
import math

from prism_mcore.config import ConfigError
from prism_mcore.config.schema import Config
from prism_mcore.data.batching import batch_for_step
from prism_mcore.data.errors import NO_USABLE_ROWS, DataError, DataStats, checked
from prism_mcore.data.images import ImageConfig, ImageReadLimits, build_image_processor, load_image_processor
from prism_mcore.data.readers import open_warmup
from prism_mcore.data.samples import SampleBuilder, SegmentPair
from prism_mcore.files import write_text_atomic
from prism_mcore.models import build_discriminator, save_hf
from prism_mcore.rollout import SamplingParams
from prism_mcore.stages.context import (
    DISCRIMINATOR_HF,
    POLICY_HF,
    RunContext,
    finish_stage,
    input_checkpoint,
    load_prompts,
    log,
    start_stage,
)
from prism_mcore.stages.rollouts import rollout, rollout_engine
from prism_mcore.training.forward import warmup_forward
from prism_mcore.training.loop import make_trainable, run_steps
from prism_mcore.training.sharding import pair_microbatches, token_budget
from prism_mcore.training.step import forward_metrics

STAGE = "warmup"


def file_pairs(ctx: RunContext, config: Config) -> tuple[list[SegmentPair], DataStats]:
    """The comparisons of the warmup file, with its images bounded as in the reference (long side <= 560)."""
    side = config.warmup.max_image_side
    images = build_image_processor(
        load_image_processor(config.model.policy_path),
        ImageConfig(
            backend=config.data.image_backend,
            max_long_side=side,
            max_pixels=side * side,
            max_image_bytes=int(config.data.max_image_mb * 1024**2),
        ),
    )
    stats = DataStats()
    builder = SampleBuilder(ctx.tokenizer, images, ctx.builder.limits, stats)
    reader = open_warmup(
        config.data.warmup_path,
        config.data.max_row_bytes,
        ImageReadLimits.from_megabytes(config.data.max_image_mb, config.data.image_url_deadline_s),
    )
    examples = checked(range(len(reader)), lambda i: builder.warmup_pairs(reader[i]), config.data.on_error, stats)
    return [pair for pairs in examples for pair in pairs], stats


def self_play_pairs(ctx: RunContext, config: Config) -> list[SegmentPair]:
    """The SFT policy's format-valid samples on alignment prompts, paired with the teacher's segments."""
    prompts = load_prompts(ctx, config.data.align_path, "warmup self-play", require_teacher=True)
    prompts = batch_for_step(prompts, 0, min(config.warmup.self_play_pairs, len(prompts)), config.run.seed)
    # A restarted warmup must train on the same pairs (and hold out the same ones): the responses are kept in the
    # run folder, since GPU and SGLang sampling do not repeat bit for bit.
    kept = ctx.run_path("stages", "warmup_self_play.json")
    record = json.loads(kept.read_text()) if kept.exists() else None
    if record is not None and record["uids"] == [prompt.uid for prompt in prompts]:
        samples = [
            dataclasses.replace(prompt, response_ids=ids)
            for prompt, ids in zip(prompts, record["responses"], strict=True)
        ]
        ctx.segmenter.segment_samples(samples)
    else:
        params = dataclasses.replace(SamplingParams.from_config(config.rollout, seed=config.run.seed), n=1)
        with rollout_engine(ctx, input_checkpoint(ctx, STAGE, POLICY_HF)) as engine:
            samples = rollout(ctx, engine, prompts, params)
        if ctx.is_main:
            responses = [sample.response_ids for sample in samples]
            write_text_atomic(kept, json.dumps({"uids": [prompt.uid for prompt in prompts], "responses": responses}))
    pairs = []
    for sample in samples:
        if sample.format_valid:
            student_caption, student_cot = ctx.builder.student_segments(sample)
            teacher_caption, teacher_cot = ctx.builder.teacher_segments(sample)
            pairs += [
                SegmentPair("caption", teacher_caption, student_caption),
                SegmentPair("cot", teacher_cot, student_cot),
            ]
    log.info("warmup: %d self-play pairs from %d samples (%d format-valid)", len(pairs), len(samples), len(pairs) // 2)
    return pairs


def run(config: Config) -> None:
    ctx = start_stage(config, STAGE)
    if ctx is None:
        return

    cfg = config.warmup
    if cfg.aux_loss_coef > 0 and config.parallel.pipeline > 1:
        # The loss pools the router statistics of every layer (PRISM_SPEC §2.5); a pipeline stage holds only its own.
        raise ConfigError(
            f"warmup.aux_loss_coef={cfg.aux_loss_coef} needs every MoE layer on one pipeline stage: run the warmup "
            f"with parallel.pipeline=1 (not {config.parallel.pipeline}), or set warmup.aux_loss_coef=0"
        )
    pairs, stats = file_pairs(ctx, config)
    if cfg.self_play_pairs > 0:
        pairs += self_play_pairs(ctx, config)
    pairs = batch_for_step(pairs, 0, len(pairs), config.run.seed)  # one fixed shuffle before the split
    heldout_count = max(1, int(len(pairs) * cfg.heldout_fraction))
    heldout, train_pairs = pairs[:heldout_count], pairs[heldout_count:]
    if not train_pairs:
        message = (
            f"{len(pairs)} usable pair(s); the warmup needs a held-out pair and one to train on ({stats.summary()})"
        )
        raise DataError(NO_USABLE_ROWS, message, file=config.data.warmup_path)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_pairs) / cfg.global_batch_size)
    log.info(
        "warmup: %d pairs (%d held out), %d steps of %d", len(pairs), heldout_count, total_steps, cfg.global_batch_size
    )

    discriminator = build_discriminator(
        config.model, config.parallel, path=input_checkpoint(ctx, STAGE, DISCRIMINATOR_HF), seed=config.run.seed
    )
    trainable = make_trainable(discriminator, cfg.optim, total_steps, config.parallel)
    loss_step = warmup_forward(cfg.aux_loss_coef, top_k=discriminator.config.moe_router_topk)
    budget = token_budget(config.data)
    heldout_batches = pair_microbatches(ctx.env, heldout, budget)

    def heldout_accuracy() -> float:
        discriminator.eval()
        accuracy = forward_metrics(trainable.models, loss_step, heldout_batches)["acc"]
        discriminator.train()
        return accuracy

    accuracy_before = heldout_accuracy()

    def step_fn(step: int) -> dict[str, float]:
        batch = batch_for_step(train_pairs, step, cfg.global_batch_size, config.run.seed)
        result = trainable.step(loss_step, pair_microbatches(ctx.env, batch, budget))
        return {**result.metrics, "grad_norm": result.grad_norm, "lr": result.lr, "skipped": float(result.skipped)}

    run_steps(
        ctx,
        STAGE,
        {"discriminator": trainable},
        total_steps,
        cfg.save_every,
        step_fn,
        log_keys=("loss", "acc", "grad_norm"),
    )
    accuracy_after = heldout_accuracy()
    log.info("warmup: held-out pairwise accuracy %.3f -> %.3f", accuracy_before, accuracy_after)
    export = save_hf(discriminator, ctx.run_path("hf", STAGE))
    finish_stage(
        ctx,
        STAGE,
        {
            "steps": total_steps,
            "data": stats.summary(),
            "heldout_pairs": heldout_count,
            "heldout_accuracy_before": accuracy_before,
            "heldout_accuracy": accuracy_after,
            DISCRIMINATOR_HF: str(export),
        },
    )
