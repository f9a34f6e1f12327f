"""The resumable step loop every stage runs (`run_steps`) and the models it trains (`Trainable`: Megatron DDP chunks,
optimizer, LR schedule, optionally their idle state in host memory).

The loop restores the newest usable checkpoint, runs the stage's `step_fn(step)` with progress and metrics, saves
every `save_every` steps and at the end, and stops a stage whose updates are skipped too often (`StageFailed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from prism_mcore.config.schema import Config, OptimConfig, ParallelConfig
from prism_mcore.training.errors import StageFailed
from prism_mcore.training.metrics import MetricsLogger, get_logger, progress
from prism_mcore.training.offload import IdleStateOffload
from prism_mcore.training.resume import CheckpointManager
from prism_mcore.training.step import build_optimizer, train_step, wrap_ddp

log = get_logger()


class StageRun(Protocol):
    """What the step loop reads of a stage's run context (`stages.context.RunContext`)."""

    config: Config
    metrics: MetricsLogger

    def run_path(self, folder: str, name: str) -> Path: ...


class Resumable(Protocol):
    """A stage's own small state beyond the step (e.g. how far dynamic sampling has read the prompts): saved with
    each step checkpoint as a JSON-able dict and put back on resume."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
    handle: Any, optim: OptimConfig, total_steps: int, parallel: ParallelConfig, offload_when_idle: bool = False
) -> Trainable:
    """`handle`'s chunks in Megatron DDP with their optimizer and schedule; with `offload_when_idle`, gradients and
    optimizer state live in host memory except during the model's own steps and checkpoints."""
    distributed_optimizer = parallel.distributed_optimizer and torch.cuda.is_available()
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


class DataExhausted(Exception):
    """Raised by a step function when the stage's data allowance (e.g. `rlvr.max_epochs`) is used up: the stage ends
    after its last completed step."""


def run_steps(
    ctx: StageRun,
    stage: str,
    trainables: dict[str, Trainable],
    total_steps: int,
    save_every: int,
    step_fn: Callable[[int], dict[str, float]],
    log_keys: tuple[str, ...] = (),
    state: Resumable | None = None,
    on_resume: Callable[[int], None] | None = None,
    before_training: Callable[[], dict[str, float]] | None = None,
) -> int:
    """The resumable step loop every stage shares: restore the latest checkpoint, run `step_fn(step)` for the
    remaining steps with progress and metrics, save every `save_every` steps and at the end. Returns the number of
    steps done, fewer than `total_steps` when `step_fn` raised `DataExhausted` (after a checkpoint of the last one).

    `state` is the stage's own resumable state beyond the step: its `state_dict()` is saved with each checkpoint
    (under `meta.state`) and handed back to `load_state_dict` on resume; `on_resume(step)` runs after a restore.
    `before_training()` runs on a fresh start only (not on resume); its metrics are logged as step 0.

    A step whose metrics report a skipped update (`skipped` or `<model>/skipped` > 0: a non-finite gradient, or
    nothing usable to train on) counts against `run.max_skipped_step_fraction` of the stage's steps; past it the
    stage stops with `StageFailed` (before saving that step), so a diverged run never reaches `.done`.
    """

    manager = CheckpointManager(ctx.run_path("checkpoints", stage), keep_last=ctx.config.run.keep_last)

    def save(step: int) -> None:
        stage_state = state.state_dict() if state is not None else {}
        with all_resident(trainables):
            manager.save(step, trainables, meta={"state": stage_state, "skipped_steps": skipped_steps})

    start = 0
    skipped_steps = 0
    allowed_skips = ctx.config.run.max_skipped_step_fraction * total_steps
    with all_resident(trainables):
        record = manager.restore(trainables)  # the newest checkpoint that checks out; unusable ones are set aside
    if record is None:
        ctx.metrics.truncate(stage, 0)  # a stage killed before its first checkpoint starts over
    else:
        start = record["step"]
        if state is not None:
            state.load_state_dict(record["meta"].get("state", {}))
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
