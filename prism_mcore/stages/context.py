"""The run context every stage starts from and the hand-over between stages: the distributed runtime, resolved
paths, tokenizer, sample builder and metrics (`setup`, once per process); whether a stage still has to run
(`start_stage`), which checkpoint it starts from (`input_checkpoint`), its prompts (`load_prompts`), and its record
(`finish_stage`: the summary, then the `.done` marker).

Stages hand over through HF checkpoints: a finished stage exports its model to `<run_dir>/hf/<stage>` and records
it in `<run_dir>/stages/<stage>.done`; the next stage starts from the latest such export (or from `model.*_path`
when none), so a restarted pipeline skips finished stages and a stage can also be run on its own.
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import AutoTokenizer

from prism_mcore.config import save_config
from prism_mcore.config.schema import STAGES, Config
from prism_mcore.data.embedded import ensure_embedded
from prism_mcore.data.errors import INVALID_VALUE, NO_USABLE_ROWS, DataError, DataStats
from prism_mcore.data.images import ImageConfig, ImageReadLimits, build_image_processor, load_image_processor
from prism_mcore.data.readers import open_prompts
from prism_mcore.data.samples import LengthLimits, PromptSet, SampleBuilder
from prism_mcore.files import write_text_atomic
from prism_mcore.record import Sample
from prism_mcore.rewards import ResponseSegmenter
from prism_mcore.rewards.verifiable import DEFAULT_DATA_SOURCE, get_judge
from prism_mcore.runtime import DistEnv, broadcast_from_main, init_distributed, seed_everything
from prism_mcore.training.metrics import MetricsLogger, get_logger
from prism_mcore.training.resume import mark_stage_done, read_stage_done
from prism_mcore.training.run_lock import lock_run_dir

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
    released_engines: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # holding no memory now

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def run_path(self, folder: str, name: str) -> Path:
        """`<run_dir>/<folder>/<name>`: a stage's folder (`checkpoints/sft`, `hf/align`) or file (`stages/*.json`)."""
        return self.run_dir / folder / name

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
        max_segment_length=config.data.max_segment_length,
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
    outcome = broadcast_from_main(outcome)
    if len(outcome) == 5:
        reason, message, file, row, field_name = outcome
        raise DataError(reason, message, file=file, row=row, field=field_name)
    rows, stats = outcome
    ctx.data_stats[name] = stats
    log.info("%s prompts (%s): %s", name, path, stats.summary())
    if not rows:
        raise DataError(NO_USABLE_ROWS, f"no usable prompt ({stats.summary()})", file=path)
    return PromptSet(reader, builder, rows, require_teacher)
