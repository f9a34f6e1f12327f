"""Resumable training state: atomic step checkpoints, keep-last-k, and per-stage completion markers.

A step checkpoint is a folder holding, per trained model (the policy; in alignment also the discriminator), a
Megatron dist-checkpoint (torch_dist) subfolder with the model and optimizer shards of every rank, plus
`meta.json` (step, LR-scheduler states, the stage's own state) and one `rng_rank{R}.pt` per rank. It is written into `.tmp-step_N`, and renamed to `step_N` by rank 0 only after every
rank has finished writing, so a run killed at any moment leaves either a complete checkpoint or none: the previous
one stays valid. `latest()` only ever returns complete folders. A stage that finishes writes `<stage>.done`
(with its exported HF checkpoint path and final metrics), so a restarted pipeline skips finished stages.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from prism_mcore.files import write_text_atomic
from prism_mcore.training.checkpoint import load_model_state, model_sharded_state

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(models: list[torch.nn.Module], optimizer: Any | None, is_loading: bool) -> dict[str, Any]:
    """The model state of `checkpoint.model_sharded_state`, with the optimizer's next to it."""
    state = model_sharded_state(models)
    if optimizer is not None:
        model_state = {key: value for chunk_state in state.values() for key, value in chunk_state.items()}
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading)
    return state


class CheckpointManager:
    """Step checkpoints of one stage under `<root>`; `root` is e.g. `<run_dir>/checkpoints/<stage>`."""

    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = max(keep_last, 1)

    def steps(self) -> list[int]:
        if not self.root.exists():
            return []
        found = (_STEP_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.root / f"step_{steps[-1]}" if steps else None

    def save(self, step: int, trainables: Mapping[str, Any], meta: dict[str, Any] | None = None) -> Path:
        """Collective: every rank calls it. `trainables` maps a name to an object with `models`, `optimizer` and
        `scheduler` (e.g. `{"policy": ..., "discriminator": ...}`); each gets its own dist-checkpoint subfolder, so
        two models with the same parameter names never collide. Returns the final folder."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            for name in trainables:
                (tmp / name).mkdir(parents=True)
        _barrier()
        for name, trainable in trainables.items():
            state = _sharded_state(trainable.models, trainable.optimizer, is_loading=False)
            dist_checkpointing.save(state, str(tmp / name))
        torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
        if _rank() == 0:
            schedulers = {name: t.scheduler.state_dict() for name, t in trainables.items() if t.scheduler is not None}
            record = {"step": step, "meta": meta or {}, "schedulers": schedulers}
            (tmp / "meta.json").write_text(json.dumps(record, indent=2))
        _barrier()
        if _rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.steps()[: -self.keep_last]:
                shutil.rmtree(self.root / f"step_{old}", ignore_errors=True)
        _barrier()
        return final

    def load(self, path: str | Path, trainables: Mapping[str, Any]) -> dict[str, Any]:
        """Restore every trainable's models, optimizer and schedule, and this rank's RNG; returns
        `{"step": ..., "meta": ...}`."""
        path = Path(path)
        record = json.loads((path / "meta.json").read_text())
        for name, trainable in trainables.items():
            state = _sharded_state(trainable.models, trainable.optimizer, is_loading=True)
            loaded = dist_checkpointing.load(state, str(path / name))
            load_model_state(trainable.models, loaded)
            if trainable.optimizer is not None:
                trainable.optimizer.load_state_dict(loaded["optimizer"])
            if trainable.scheduler is not None:
                trainable.scheduler.load_state_dict(record["schedulers"][name])
        rng_file = path / f"rng_rank{_rank()}.pt"
        if rng_file.exists():  # absent when resuming on a different world size: keep the fresh seeds
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return record


def stage_done_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / "stages" / f"{stage}.done"


def read_stage_done(run_dir: str | Path, stage: str) -> dict[str, Any] | None:
    path = stage_done_path(run_dir, stage)
    return json.loads(path.read_text()) if path.exists() else None


def mark_stage_done(run_dir: str | Path, stage: str, record: dict[str, Any]) -> None:
    """Rank 0 writes the marker atomically; a stage with a marker is skipped when the pipeline restarts."""
    if _rank() != 0:
        return
    write_text_atomic(stage_done_path(run_dir, stage), json.dumps(record, indent=2))
