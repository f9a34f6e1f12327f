"""Stage 1, SFT: fine-tune the policy on multimodal demonstrations (PRISM_SPEC §7).

Each step takes the next `global_batch_size` conversations (a per-epoch shuffle, so the data position is the step),
gives each data-parallel rank its share, packs it into token-budget micro-batches and minimises the negative
log-likelihood of the assistant tokens (a global token mean). A held-out slice gives the validation loss. At the end
the policy is exported as an HF checkpoint, which the later stages and the rollout engines start from, and evaluated
greedily on the validation and test prompts. Data without a usable conversation stops the stage before its first
step; a batch whose every row was dropped makes no update and counts as a skipped step (`run.max_skipped_step_fraction`).

Released setting: AdamW lr 1e-5, cosine with 10% warmup, one epoch, max length 8192.
"""

from __future__ import annotations

import math

from prism_mcore.config.schema import Config
from prism_mcore.data.batching import batch_for_step
from prism_mcore.data.errors import NO_USABLE_ROWS, DataError, DataStats, OnError, checked
from prism_mcore.data.images import ImageReadLimits
from prism_mcore.data.readers import RecordReader, SftExample, open_sft
from prism_mcore.data.samples import SampleBuilder, TokenSequence
from prism_mcore.models import build_policy, save_hf
from prism_mcore.stages.context import POLICY_HF, finish_stage, input_checkpoint, log, start_stage
from prism_mcore.stages.evaluation import evaluate_splits
from prism_mcore.stages.rollouts import rollout_engine
from prism_mcore.training.forward import sft_forward
from prism_mcore.training.loop import make_trainable, run_steps
from prism_mcore.training.sharding import sft_microbatches, token_budget
from prism_mcore.training.step import forward_metrics

STAGE = "sft"
MAX_HELDOUT = 256


def require_usable_row(
    reader: RecordReader[SftExample], indices: list[int], builder: SampleBuilder, on_error: OnError
) -> None:
    """Stop with one `DataError` unless some training row builds (rows are otherwise built lazily, step by step).

    Reads rows in order until the first usable one: one row for good data, the whole file only when none is usable.
    Counted apart, so the stage's own counts stay those of the steps.
    """
    probe = SampleBuilder(builder.tokenizer, builder.images, builder.limits, DataStats())
    stats = probe.stats
    for _ in checked(indices, lambda i: probe.sft_sequence(reader[i]), on_error, stats):
        return
    raise DataError(NO_USABLE_ROWS, f"no usable conversation to train on ({stats.summary()})", file=str(reader.path))


def run(config: Config) -> None:
    ctx = start_stage(config, STAGE)
    if ctx is None:
        return

    cfg = config.sft
    image_limits = ImageReadLimits.from_megabytes(config.data.max_image_mb, config.data.image_url_deadline_s)
    reader = open_sft(config.data.sft_path, config.data.sft_dataset or None, config.data.max_row_bytes, image_limits)
    stats = DataStats()
    builder = SampleBuilder(ctx.tokenizer, ctx.builder.images, ctx.builder.limits, stats)

    def sequences(indices: list[int]) -> list[TokenSequence]:
        return list(checked(indices, lambda i: builder.sft_sequence(reader[i]), config.data.on_error, stats))

    heldout = min(MAX_HELDOUT, len(reader) // 50)
    train_indices = list(range(len(reader) - heldout))
    require_usable_row(reader, train_indices, builder, config.data.on_error)
    budget = token_budget(config.data)
    heldout_sequences = sequences(list(range(len(reader) - heldout, len(reader))))
    heldout_batches = sft_microbatches(ctx.env, heldout_sequences, budget) if heldout_sequences else []
    steps_per_epoch = math.ceil(len(train_indices) / cfg.global_batch_size)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    log.info(
        "sft: %d conversations (%d held out), %d steps of %d", len(reader), heldout, total_steps, cfg.global_batch_size
    )

    policy = build_policy(config.model, config.parallel, path=input_checkpoint(ctx, STAGE, POLICY_HF))
    trainable = make_trainable(policy, cfg.optim, total_steps, config.parallel)

    def validation_loss() -> float:
        policy.eval()
        loss = forward_metrics(trainable.models, sft_forward, heldout_batches)["loss"]
        policy.train()
        return loss

    def step_fn(step: int) -> dict[str, float]:
        batch = sequences(batch_for_step(train_indices, step, cfg.global_batch_size, config.run.seed))
        if not batch:  # every row of this batch was dropped (the same on every rank): no update, counted as skipped
            return {"skipped": 1.0}
        result = trainable.step(sft_forward, sft_microbatches(ctx.env, batch, budget))
        metrics = {**result.metrics, "grad_norm": result.grad_norm, "lr": result.lr, "skipped": float(result.skipped)}
        if heldout_batches and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            metrics["val_loss"] = validation_loss()
        return metrics

    run_steps(
        ctx,
        STAGE,
        {"policy": trainable},
        total_steps,
        cfg.save_every,
        step_fn,
        log_keys=("loss", "val_loss", "grad_norm", "lr"),
    )
    # Conversations are built lazily, step by step, so these counts cover every epoch (a row used twice counts twice).
    record = {"steps": total_steps, "conversations_built": stats.summary()}
    if heldout_batches:
        record["val_loss"] = validation_loss()
    export = save_hf(policy, ctx.run_path("hf", STAGE))
    record[POLICY_HF] = str(export)
    with rollout_engine(ctx, str(export)) as engine:
        record["eval"] = evaluate_splits(ctx, engine)
    finish_stage(ctx, STAGE, record)
