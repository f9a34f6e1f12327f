"""What every stage shares: the run context (distributed runtime, resolved paths, tokenizer, sample builder,
logging), which checkpoint a stage starts from, rollouts on rank 0 shared with every rank, weight sync, evaluation,
and trainable models (DDP + optimizer + schedule).

Stages hand over through HF checkpoints: a finished stage exports its model to `<run_dir>/hf/<stage>` and records
it in `<run_dir>/stages/<stage>.done`; the next stage starts from the latest such export (or from `model.*_path`
when none), so a restarted pipeline skips finished stages and a stage can also be run on its own.
"""

from __future__ import annotations

import dataclasses
import json
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from prism_mcore.algorithms import PolicyLossConfig, policy_loss_preset
from prism_mcore.config import save_config
from prism_mcore.config.schema import STAGES, Config, OptimConfig, PolicyLossSettings
from prism_mcore.data.batching import pack_sequences, token_budget_batches
from prism_mcore.data.embedded import ensure_embedded
from prism_mcore.data.errors import INVALID_VALUE, NO_USABLE_ROWS, DataError, DataStats
from prism_mcore.data.images import ImageConfig, ImageReadLimits, build_image_processor, load_image_processor
from prism_mcore.data.readers import open_prompts
from prism_mcore.data.samples import LengthLimits, PromptSet, SampleBuilder
from prism_mcore.files import write_text_atomic
from prism_mcore.models import iter_hf_weights
from prism_mcore.record import Sample
from prism_mcore.rewards import ResponseSegmenter, reward_batch
from prism_mcore.rewards.verifiable import DEFAULT_DATA_SOURCE, get_judge
from prism_mcore.rollout import RolloutEngine, SamplingParams, build_rollout_engine, weights_for_sync
from prism_mcore.runtime import DistEnv, init_distributed, seed_everything
from prism_mcore.stages.errors import StageFailed
from prism_mcore.training.forward import token_batch
from prism_mcore.training.metrics import MetricsLogger, get_logger, progress
from prism_mcore.training.offload import IdleStateOffload
from prism_mcore.training.resume import CheckpointManager, mark_stage_done, read_stage_done
from prism_mcore.training.run_lock import lock_run_dir
from prism_mcore.training.step import Filler, build_optimizer, train_step, wrap_ddp

log = get_logger()

# Which artefact each stage hands over, under which key of its `.done` record.
POLICY_HF, DISCRIMINATOR_HF = "policy_hf", "discriminator_hf"


@dataclass
class RunContext:
    """Built once per process and shared by the stages it runs."""

    config: Config
    env: DistEnv
    run_dir: Path
    tokenizer: Any
    builder: SampleBuilder
    segmenter: ResponseSegmenter
    metrics: MetricsLogger
    data_stats: dict[str, DataStats] = field(default_factory=dict)
    eval_prompts: dict[str, PromptSet] = field(default_factory=dict)
    stage: str = ""  # the stage running now (`start_stage`)
    released_engines: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # holding no memory now

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def stage_dir(self, kind: str, stage: str) -> Path:
        return self.run_dir / kind / stage

    def barrier(self) -> None:
        dist.barrier()


_CONTEXT: RunContext | None = None


def quiet_libraries() -> None:
    """Keep the console to our progress and metrics: Megatron logs every parameter and optimizer field at INFO,
    transformers draws a progress bar per checkpoint load, datasets one per data file read."""
    import logging

    import datasets
    import transformers

    datasets.disable_progress_bars()
    logging.getLogger("megatron").setLevel(logging.ERROR)  # deprecation and missing-fusion notices too
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()


def resolve_embedded_paths(config: Config) -> Config:
    """Fill every empty model/data path with the embedded default's (built on first use, offline)."""
    paths = {**dataclasses.asdict(config.model), **dataclasses.asdict(config.data)}
    names = [name for name in paths if name.endswith("_path") and not paths[name]]
    if not names:
        return config

    assets = ensure_embedded()
    for section in (config.model, config.data):
        for name in names:
            if hasattr(section, name) and hasattr(assets, name):
                setattr(section, name, str(getattr(assets, name)))
    return config


def setup(config: Config) -> RunContext:
    """The run context: process groups, resolved paths, tokenizer and sample builder (once per process)."""
    global _CONTEXT
    if _CONTEXT is not None and _CONTEXT.config is config:
        return _CONTEXT
    quiet_libraries()
    env = init_distributed(config.parallel, seed=config.run.seed)
    resolve_embedded_paths(config)
    run_dir = Path(config.run.output_dir)
    if env.rank == 0:
        lock_run_dir(run_dir)
        save_config(config, run_dir / "config.json")

    tokenizer = AutoTokenizer.from_pretrained(config.model.policy_path, local_files_only=True)
    images = build_image_processor(
        load_image_processor(config.model.policy_path),
        ImageConfig(backend=config.data.image_backend, max_image_bytes=int(config.data.max_image_mb * 1024**2)),
    )
    limits = LengthLimits(
        max_prompt_length=config.data.max_prompt_length,
        max_response_length=config.data.max_response_length,
        max_sequence_length=config.sft.max_length,
        over_length=config.data.over_length,
    )
    builder = SampleBuilder(tokenizer, images, limits)
    segmenter = ResponseSegmenter(tokenizer, eos_token_ids=[builder.eos_id, builder.pad_id])
    _CONTEXT = RunContext(
        config=config,
        env=env,
        run_dir=run_dir,
        tokenizer=tokenizer,
        builder=builder,
        segmenter=segmenter,
        metrics=MetricsLogger(run_dir, tensorboard=config.run.tensorboard),
    )
    log.info(
        "run %s: world %d (tp %d, pp %d, ep %d, dp %d) on %s",
        run_dir,
        env.world_size,
        env.tp,
        env.pp,
        env.ep,
        env.dp,
        env.device,
    )
    return _CONTEXT


def start_stage(config: Config, stage: str) -> RunContext | None:
    """The run context for `stage`, or None when an earlier run of this pipeline already finished it.

    Every generator is seeded for the stage here, so nothing that ran before it in this process (a first-use build
    of the embedded default, an earlier stage) changes what it draws.
    """
    ctx = setup(config)
    if read_stage_done(ctx.run_dir, stage):
        log.info("%s: already done, skipped", stage)
        return None
    seed_everything(config.run.seed, stage)
    ctx.stage = stage
    return ctx


def input_checkpoint(ctx: RunContext, stage: str, key: str) -> str:
    """The HF checkpoint `stage` starts from: the latest earlier stage's export of `key`, else the configured one."""
    for earlier in reversed(STAGES[: STAGES.index(stage)]):
        record = read_stage_done(ctx.run_dir, earlier)
        if record and key in record:
            return record[key]
    return ctx.config.model.policy_path if key == POLICY_HF else ctx.config.model.discriminator_path


def finish_stage(ctx: RunContext, stage: str, record: dict[str, Any]) -> None:
    """Record a finished stage: its results in the summary first, then its marker (a run killed in between redoes
    the stage rather than skipping it with its results missing)."""
    update_summary(ctx, stage, record)
    mark_stage_done(ctx.run_dir, stage, record)
    ctx.barrier()


def update_summary(ctx: RunContext, stage: str, record: dict[str, Any]) -> None:
    """Merge a stage's results into `<run_dir>/summary.json` (rank 0, atomic)."""
    if not ctx.is_main:
        return
    path = ctx.run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {"stages": {}}
    summary["stages"][stage] = record
    summary.setdefault("data", {}).update({name: stats.summary() for name, stats in ctx.data_stats.items()})
    write_text_atomic(path, json.dumps(summary, indent=2))


def _judged(sample: Sample) -> None:
    """Refuse a prompt whose `data_source` has no reward judge (found here, not at its first reward)."""
    try:
        get_judge(sample.data_source or DEFAULT_DATA_SOURCE)
    except ValueError as error:
        raise DataError(INVALID_VALUE, str(error), field="data_source") from None


def load_prompts(ctx: RunContext, path: str, name: str, require_teacher: bool) -> PromptSet:
    """Alignment/RL/evaluation prompts, validated under `data.on_error` (counts kept per file) and built per step.

    Rank 0 validates every row once and shares the usable rows (or the error that stopped it) with the other ranks.
    """
    data = ctx.config.data
    image_limits = ImageReadLimits.from_megabytes(data.max_image_mb, data.image_url_deadline_s)
    reader = open_prompts(
        path, require_teacher=require_teacher, max_row_bytes=data.max_row_bytes, image_limits=image_limits
    )
    builder = SampleBuilder(ctx.tokenizer, ctx.builder.images, ctx.builder.limits, DataStats())
    outcome: Any = None
    if ctx.is_main:
        try:
            outcome = (
                PromptSet.validate(reader, builder, ctx.config.data.on_error, _judged, require_teacher).rows,
                builder.stats,
            )
        except DataError as error:
            outcome = (error.reason, error.message, error.file, error.row, error.field)
    if ctx.env.world_size > 1:
        holder = [outcome]
        dist.broadcast_object_list(holder, src=0)
        outcome = holder[0]
    if len(outcome) == 5:
        reason, message, file, row, field_name = outcome
        raise DataError(reason, message, file=file, row=row, field=field_name)
    rows, stats = outcome
    ctx.data_stats[name] = stats
    log.info("%s prompts (%s): %s", name, path, stats.summary())
    if not rows:
        raise DataError(NO_USABLE_ROWS, f"no usable prompt ({stats.summary()})", file=path)
    return PromptSet(reader, builder, rows, require_teacher)


def broadcast_samples(ctx: RunContext, samples: list[Sample] | None) -> list[Sample]:
    """Rank 0's samples on every rank (rollouts run once, on rank 0, and every rank trains on them)."""
    if ctx.env.world_size == 1:
        return samples
    holder = [samples]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


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
    return broadcast_samples(ctx, samples)


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


def make_engine(ctx: RunContext, policy_path: str, weight_version: int = 0) -> RolloutEngine | None:
    """The rollout engine (rank 0 only: it generates for everyone); dumping or replaying the stage's calls under
    `rollout.dump_dir` / `rollout.replay_dir` when set."""
    if not ctx.is_main:
        return None
    device = ctx.env.device if ctx.env.device.type == "cuda" else "cpu"
    return build_rollout_engine(
        ctx.config.rollout,
        policy_path,
        run_dir=ctx.run_dir,
        device=device,
        weight_version=weight_version,
        stage=ctx.stage,
    )


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


EVAL_WAVE = 1024  # evaluation prompts per generate call


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
    holder = [result]
    if ctx.env.world_size > 1:
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


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


def dp_share(ctx: RunContext, items: list) -> list:
    """This data-parallel rank's share of a batch that every rank holds: a contiguous slice (so the samples of a
    prompt mostly stay together), shares differing in size by at most one. May be empty when items < ranks."""
    base, extra = divmod(len(items), ctx.env.dp)
    rank = ctx.env.dp_rank
    start = rank * base + min(rank, extra)
    return items[start : start + base + (rank < extra)]


def or_filler(batches: list, build: Callable[[], Any]) -> list:
    """`batches`, or a single (tiny) `Filler` shaped like `build()` when this rank's share is empty: every rank joins
    each step."""
    return batches if batches else [Filler.of(build())]


def token_budget(ctx: RunContext, stage_budget: int = 0) -> int:
    """Tokens per micro-batch: the stage's own budget when set, else `data.max_tokens_per_microbatch`."""
    return stage_budget or ctx.config.data.max_tokens_per_microbatch


@dataclass
class Trainable:
    """A model being trained: its Megatron handle, DDP-wrapped chunks, optimizer and LR schedule."""

    handle: Any
    models: list[torch.nn.Module]
    optimizer: Any
    scheduler: Any
    idle_offload: IdleStateOffload | None = None  # gradients and optimizer state in host memory between steps

    @contextmanager
    def resident(self) -> Iterator[None]:
        """Gradients and optimizer state on the device inside the block (they always are without offload)."""
        if self.idle_offload is None:
            yield
            return
        self.idle_offload.reload()
        try:
            yield
        finally:
            self.idle_offload.offload()

    def step(self, forward_step: Callable, microbatches: list) -> Any:
        """One optimizer step of this model over this rank's micro-batches (`training.step.train_step`)."""
        with self.resident():
            return train_step(self.models, self.optimizer, self.scheduler, forward_step, microbatches)


def make_trainable(
    ctx: RunContext, handle: Any, optim: OptimConfig, total_steps: int, offload_when_idle: bool = False
) -> Trainable:
    """`handle`'s chunks in Megatron DDP with their optimizer and schedule; with `offload_when_idle`, gradients and
    optimizer state live in host memory except during the model's own steps and checkpoints."""
    distributed_optimizer = ctx.config.parallel.distributed_optimizer and torch.cuda.is_available()
    models = wrap_ddp(handle.chunks, use_distributed_optimizer=distributed_optimizer)
    optimizer, scheduler = build_optimizer(
        models, optim, total_steps, distributed_optimizer, bf16=bool(getattr(handle.config, "bf16", False))
    )
    trainable = Trainable(handle=handle, models=models, optimizer=optimizer, scheduler=scheduler)
    if offload_when_idle:
        trainable.idle_offload = IdleStateOffload(models, optimizer)
        trainable.idle_offload.offload()
    return trainable


@contextmanager
def all_resident(trainables: dict[str, Trainable]) -> Iterator[None]:
    """Every trainable's full state on the device (checkpoint save and load read and write it)."""
    with ExitStack() as stack:
        for trainable in trainables.values():
            stack.enter_context(trainable.resident())
        yield


def prompt_order(num_prompts: int, seed: int, epoch: int) -> list[int]:
    """A deterministic shuffle of prompt indices per epoch: the data position is then just the step number."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(num_prompts, generator=generator).tolist()


def batch_for_step(items: list, step: int, per_step: int, seed: int) -> list:
    """The items of step `step` (0-based): consecutive slices of per-epoch shuffles, wrapping around epochs.

    A pure function of the step, so resuming at a step needs no saved data-loader state.
    """
    chosen = []
    position = step * per_step
    while len(chosen) < per_step:
        epoch, offset = divmod(position, len(items))
        order = prompt_order(len(items), seed, epoch)
        take = min(per_step - len(chosen), len(items) - offset)
        chosen += [items[i] for i in order[offset : offset + take]]
        position += take
    return chosen


class DataExhausted(Exception):
    """Raised by a step function when the stage's data allowance (e.g. `rlvr.max_epochs`) is used up: the stage ends
    after its last completed step."""


def run_steps(
    ctx: RunContext,
    stage: str,
    trainables: dict[str, Trainable],
    total_steps: int,
    save_every: int,
    step_fn: Callable[[int], dict[str, float]],
    log_keys: tuple[str, ...] = (),
    state: dict[str, Any] | None = None,
    on_resume: Callable[[int], None] | None = None,
    before_training: Callable[[], dict[str, float]] | None = None,
) -> int:
    """The resumable step loop every stage shares: restore the latest checkpoint, run `step_fn(step)` for the
    remaining steps with progress and metrics, save every `save_every` steps and at the end. Returns the number of
    steps done, fewer than `total_steps` when `step_fn` raised `DataExhausted` (after a checkpoint of the last one).

    `state` is the stage's own small JSON-able state beyond the step (e.g. how many generation batches dynamic
    sampling consumed): saved with each checkpoint and restored in place; `on_resume(step)` runs after a restore.
    `before_training()` runs on a fresh start only (not on resume); its metrics are logged as step 0.

    A step whose metrics report a skipped update (`skipped` or `<model>/skipped` > 0: a non-finite gradient, or
    nothing usable to train on) counts against `run.max_skipped_step_fraction` of the stage's steps; past it the
    stage stops with `StageFailed` (before saving that step), so a diverged run never reaches `.done`.
    """

    state = {} if state is None else state
    manager = CheckpointManager(ctx.stage_dir("checkpoints", stage), keep_last=ctx.config.run.keep_last)

    def save(step: int) -> None:
        with all_resident(trainables):
            manager.save(step, trainables, meta={"state": state, "skipped_steps": skipped_steps})

    start = 0
    skipped_steps = 0
    allowed_skips = ctx.config.run.max_skipped_step_fraction * total_steps
    with all_resident(trainables):
        record = manager.restore(trainables)  # the newest checkpoint that checks out; unusable ones are set aside
    if record is None:
        ctx.metrics.truncate(stage, 0)  # a stage killed before its first checkpoint starts over
    else:
        start = record["step"]
        state.update(record["meta"].get("state", {}))
        skipped_steps = record["meta"].get("skipped_steps", 0)
        ctx.metrics.truncate(stage, start)
        log.info("%s: resumed from %s (step %d of %d)", stage, manager.root / f"step_{start}", start, total_steps)
        if on_resume is not None:
            on_resume(start)
    if record is None and before_training is not None:
        ctx.metrics.log(stage, 0, before_training())
    for step in progress(range(start, total_steps), desc=stage, total=total_steps - start):
        began = time.time()
        try:
            metrics = step_fn(step)
        except DataExhausted as reason:
            log.info("%s: stopped after step %d of %d: %s", stage, step, total_steps, reason)
            if step > start and not (save_every and step % save_every == 0):
                save(step)
            return step
        metrics["step_time_s"] = time.time() - began
        ctx.metrics.log(stage, step + 1, metrics)
        if (step + 1) % ctx.config.run.log_every == 0 or step + 1 == total_steps:
            shown = ", ".join(f"{key} {metrics[key]:.4g}" for key in log_keys if key in metrics)
            log.info("%s step %d/%d: %s (%.2fs)", stage, step + 1, total_steps, shown, metrics["step_time_s"])
        skipped_steps += any(value for key, value in metrics.items() if key.rsplit("/", 1)[-1] == "skipped")
        if skipped_steps > allowed_skips:
            raise StageFailed(
                f"{stage}: {skipped_steps} of the first {step + 1} steps skipped their update (non-finite gradient "
                f"or no usable data), over run.max_skipped_step_fraction={ctx.config.run.max_skipped_step_fraction}"
                f" of {total_steps} steps; lower the learning rate or check the data (the stage is not marked done)"
            )
        if (save_every and (step + 1) % save_every == 0) or step + 1 == total_steps:
            save(step + 1)
    return total_steps


def policy_loss_config(settings: PolicyLossSettings, tis_cap: float) -> PolicyLossConfig:
    """The algorithms' loss config: the named preset with the fields the run changed (and TIS when enabled)."""
    overrides: dict[str, Any] = {
        name: getattr(settings, name)
        for name in ("clip_low", "clip_high", "aggregation")
        if getattr(settings, name) is not None
    }
    if settings.dual_clip is not None:
        overrides["dual_clip"] = settings.dual_clip or None
    if tis_cap > 0:
        overrides["tis_cap"] = tis_cap
    return policy_loss_preset(settings.preset, **overrides)


def policy_microbatches(ctx: RunContext, samples: list[Sample], budget: int = 0) -> list:
    """This rank's rollouts as packed policy micro-batches with advantages and rollout log-probs."""

    def batch(chosen: list[Sample]) -> Any:
        return token_batch(
            pack_sequences([ctx.builder.policy_sequence(sample) for sample in chosen], share_images=True),
            advantages=[sample.advantage for sample in chosen],
            rollout_logprobs=[sample.rollout_logprobs for sample in chosen],
        )

    mine = dp_share(ctx, samples)
    lengths = [len(sample.prompt_ids) + sample.response_length for sample in mine]
    groups = token_budget_batches(lengths, token_budget(ctx, budget))
    return or_filler([batch([mine[i] for i in group]) for group in groups], lambda: batch(samples[:1]))


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
