"""Resumable training state: verified step checkpoints, keep-last-k, and per-stage completion markers.

A step checkpoint is a folder holding, per trained model (the policy; in alignment also the discriminator), a
Megatron dist-checkpoint (torch_dist) subfolder with the model and optimizer shards of every rank, plus
`meta.json` (step, LR-scheduler states, the stage's own state), one `rng_rank{R}.pt` per rank and `manifest.json`
(the byte size and SHA-256 of every other file, the step and the world size). It is written into `.tmp-step_N`, and
renamed to `step_N` by rank 0 only after every rank has finished writing and the manifest is complete, so a run
killed at any moment leaves either a complete checkpoint or none: the previous one stays valid. A stage that finishes
writes `<stage>.done` (with its exported HF checkpoint path and final metrics), so a restarted pipeline skips finished
stages.

Nothing in a checkpoint runs code when loaded: RNG states are stored as tensors and plain numbers and read with
`torch.load(weights_only=True)`, and the model and optimizer shards go through `checkpoint.dist_load`.

`restore` resumes from the newest checkpoint that checks out: every file the manifest lists exists with its size and
hash (the ranks hash a share each), `meta.json` parses and this rank's RNG file loads. A checkpoint that fails (a
truncated or missing file, a planted one, no manifest: e.g. written before manifests existed) is renamed to
`bad-step_N`, with one warning naming it and why, and the next older one is tried; with none left the stage starts
from step 0, again with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from prism_mcore.files import write_text_atomic
from prism_mcore.training.checkpoint import (
    check_dist_metadata,
    dist_load,
    dist_save,
    load_model_state,
    model_sharded_state,
    refusal_reason,
)

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
_FORMAT = 1  # manifest format; RNG states as tensors (format 0, before manifests, pickled Python objects)
_HASH_CHUNK = 1 << 24


class CheckpointInvalid(Exception):
    """A step checkpoint that is incomplete, altered or unreadable; the message says which file and why."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _rng_state() -> dict[str, Any]:
    """Every generator a step draws from, as tensors and plain numbers (so it loads with `weights_only=True`)."""
    version, python_state, gauss_next = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss_next},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker().get_states()
    if not all(isinstance(value, torch.Tensor) for value in tracker.values()):
        raise TypeError(f"Megatron's RNG tracker holds non-tensor states: {sorted(tracker)}")
    state["tracker"] = dict(tracker)
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under `folder` (collective: each rank hashes a share)."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    mine = {}
    for name in names[_rank() :: _world_size()]:
        mine[name] = {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
    return {name: entry for share in _all_gather(mine) for name, entry in share.items()}


def _file_problem(folder: Path, name: str, entry: dict[str, Any]) -> str | None:
    path = folder / name
    if not path.exists():
        return f"{name} is missing"
    if not path.is_file():
        return f"{name} is not a regular file"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{name} has {size} bytes, the manifest says {entry['bytes']}"
    if _sha256(path) != entry["sha256"]:
        return f"{name} does not match its SHA-256 in the manifest"
    return None


def _read_verified(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """This rank's share of checking a step checkpoint (its share of the hashes, the dist-checkpoint metadata, its own
    RNG file), then `meta.json`'s record and its RNG state; CheckpointInvalid naming the first problem."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != _FORMAT or manifest.get("step") != int(path.name.split("_")[-1]):
            raise CheckpointInvalid(f"{MANIFEST} is for step {manifest.get('step')} (format {manifest.get('format')})")
        names = sorted(files)
        for name in names[_rank() :: _world_size()]:
            problem = _file_problem(path, name, files[name])
            if problem:
                raise CheckpointInvalid(problem)
        for name in names:
            if Path(name).name == ".metadata":
                check_dist_metadata(path / name)
        record = json.loads((path / "meta.json").read_text())
        rng_name = f"rng_rank{_rank()}.pt"
        if manifest["world_size"] != _world_size() or rng_name not in files:
            return record, None  # another world size: fresh seeds
        try:
            return record, torch.load(path / rng_name, weights_only=True)
        except pickle.UnpicklingError as error:
            raise pickle.UnpicklingError(f"{rng_name}: {refusal_reason(error)}") from None
    except FileNotFoundError as error:
        raise CheckpointInvalid(f"{Path(error.filename).name} is missing") from None
    except pickle.UnpicklingError as error:  # a planted or foreign file: refused, never run
        raise CheckpointInvalid(f"refused to unpickle {str(error).splitlines()[0]}") from None
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointInvalid(f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}") from None


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
        """The newest complete (renamed) checkpoint folder, not yet verified."""
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
            dist_save(_sharded_state(trainable.models, trainable.optimizer, is_loading=False), tmp / name)
        torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
        if _rank() == 0:
            schedulers = {name: t.scheduler.state_dict() for name, t in trainables.items() if t.scheduler is not None}
            record = {"step": step, "meta": meta or {}, "schedulers": schedulers}
            (tmp / "meta.json").write_text(json.dumps(record, indent=2))
        _barrier()
        files = _hash_files(tmp)
        if _rank() == 0:
            manifest = {"format": _FORMAT, "step": step, "world_size": _world_size(), "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.steps()[: -self.keep_last]:
                shutil.rmtree(self.root / f"step_{old}", ignore_errors=True)
        _barrier()
        return final

    def _check(self, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """`(meta.json's record, this rank's RNG state or None)` if `path` is whole on every rank; else
        CheckpointInvalid with the first problem any rank found (collective: every rank gets the same answer)."""
        try:
            record, rng = _read_verified(path)
            problem = None
        except CheckpointInvalid as error:
            record, rng, problem = None, None, str(error)
        problems = [p for p in _all_gather(problem) if p]
        if problems:
            raise CheckpointInvalid(problems[0])
        return record, rng

    def load(self, path: str | Path, trainables: Mapping[str, Any]) -> dict[str, Any]:
        """Verify `path`, then restore every trainable's models, optimizer and schedule, and this rank's RNG (kept
        fresh when the world size changed); returns `{"step": ..., "meta": ...}`. CheckpointInvalid, with nothing
        restored, if the checkpoint does not check out."""
        path = Path(path)
        record, rng = self._check(path)
        for name, trainable in trainables.items():
            state = _sharded_state(trainable.models, trainable.optimizer, is_loading=True)
            loaded = dist_load(state, path / name)
            load_model_state(trainable.models, loaded)
            if trainable.optimizer is not None:
                trainable.optimizer.load_state_dict(loaded["optimizer"])
            if trainable.scheduler is not None:
                trainable.scheduler.load_state_dict(record["schedulers"][name])
        if rng is not None:
            _set_rng_state(rng)
        return record

    def restore(self, trainables: Mapping[str, Any]) -> dict[str, Any] | None:
        """Load the newest checkpoint that checks out (see the module docstring); None if there is none."""
        steps = self.steps()
        for step in reversed(steps):
            path = self.root / f"step_{step}"
            try:
                return self.load(path, trainables)
            except CheckpointInvalid as error:
                set_aside = self.root / f"bad-step_{step}"
                if _rank() == 0:  # every rank has the same verdict: one warning per job
                    log.warning("step checkpoint %s is unusable (%s): moved to %s", path, error, set_aside.name)
                    shutil.rmtree(set_aside, ignore_errors=True)
                    path.rename(set_aside)
                _barrier()
        if steps and _rank() == 0:
            log.warning("no usable step checkpoint in %s: starting from step 0", self.root)
        return None


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
