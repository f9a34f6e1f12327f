"""Run logging: rank-0 console logs, progress bars, metrics as JSONL in the run folder, TensorBoard when installed,
and the training-curve plot every run leaves behind.

Only global rank 0 writes: other ranks get a silent logger, disabled progress bars and a `MetricsLogger` that
drops records, so stage code can log unconditionally.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from prism_mcore.files import write_text_atomic

T = TypeVar("T")


def global_rank() -> int:
    return int(os.environ.get("RANK", 0))


def get_logger(name: str = "prism_mcore") -> logging.Logger:
    """A console logger that prints on rank 0 only, with elapsed time and stage name."""
    logger = logging.getLogger(name)
    if not getattr(logger, "_prism_configured", False):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if global_rank() == 0 else logging.WARNING)
        logger.propagate = False
        logger._prism_configured = True
    return logger


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar on rank 0 (to stderr), a plain iterator elsewhere."""
    return iter(tqdm(iterable, desc=desc, total=total, disable=global_rank() != 0, dynamic_ncols=True, leave=False))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf; a null is visible and never mistaken for a number
    return value


class MetricsLogger:
    """Appends one JSON object per logged step to `<run_dir>/metrics.jsonl` (and TensorBoard when available).

    Records carry the stage and step, so one file holds a whole multi-stage run and resumed runs append to it.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.enabled = global_rank() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._writer = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"stage": stage, "step": step, "time": round(time.time(), 3)}
        record.update({key: _finite_or_none(float(value)) for key, value in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(f"{stage}/{key}", float(value), step)

    def truncate(self, stage: str, last_step: int) -> None:
        """Drop `stage`'s records after `last_step`: a run resumed from that step logs those steps again."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["stage"] != stage or r["step"] <= last_step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file. A last line cut off mid-write (a killed run, a full disk) is left out; a bad
    line anywhere else is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if position == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({error})") from None
    return records


def plot_metrics(metrics_path: str | Path, png_path: str | Path, keys_by_stage: dict[str, list[str]]) -> Path:
    """Plot the named curves of each stage (one panel per stage) into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    stages = [stage for stage in keys_by_stage if any(r["stage"] == stage for r in records)]
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(4.5 * max(len(stages), 1), 3.4), squeeze=False)
    for axis, stage in zip(axes[0], stages, strict=False):
        rows = [r for r in records if r["stage"] == stage]
        for key in keys_by_stage[stage]:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points, strict=True), label=key)
        axis.set_title(stage)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
