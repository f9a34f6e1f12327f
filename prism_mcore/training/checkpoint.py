"""Model weights in Megatron's distributed checkpoint format (torch_dist), for the policy and the discriminator.

A checkpoint folder holds every rank's shards under layout-independent keys, so it loads into any TP/PP/EP layout
(saved at TP=2, loaded at TP=1, ...: tests/distributed/test_models_parallel.py). The discriminator's value head is
saved under `language_model.output_layer.weight` like any replicated weight (models/discriminator.py).

Writes are atomic: shards go to `<dir>.tmp`, which rank 0 renames to `<dir>` once every rank has finished, replacing
an older checkpoint of that name; a crash leaves the previous checkpoint intact. `model_sharded_state` is the model
part of a sharded state dict, so a resumable checkpoint adds optimizer, scheduler, RNG and data-position state next
to it in the same `dist_checkpointing.save` call.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model

from prism_mcore.models.build import ModelHandle

Models = ModelHandle | Sequence[torch.nn.Module]


def _chunks(models: Models) -> list[torch.nn.Module]:
    """The bare model chunks, under any DDP / Float16Module wrapping (checkpoint keys do not depend on it)."""
    chunks = models.chunks if isinstance(models, ModelHandle) else list(models)
    return unwrap_model(chunks)


def _chunk_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"  # Megatron's convention for virtual pipeline chunks


def model_sharded_state(models: Models) -> dict[str, Any]:
    """`{"model": sharded state}` (or `model0`, `model1`, ... per virtual pipeline chunk) of these chunks."""
    chunks = _chunks(models)
    return {_chunk_key(i, len(chunks)): chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_model_checkpoint(models: Models, directory: str | Path) -> Path:
    """Save the model weights to `directory` (collective: every rank calls it). Returns the folder."""
    directory = Path(directory)
    staging = directory.with_name(directory.name + ".tmp")
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(model_sharded_state(models), str(staging))
    _barrier()
    if is_main:
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
    _barrier()
    return directory


def load_model_checkpoint(models: Models, directory: str | Path) -> None:
    """Load weights saved by `save_model_checkpoint` (any parallel layout) into these chunks, strictly."""
    directory = Path(directory)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        raise FileNotFoundError(f"{directory} is not a Megatron distributed checkpoint")
    load_model_state(models, dist_checkpointing.load(model_sharded_state(models), str(directory)))


def load_model_state(models: Models, loaded: dict[str, Any]) -> None:
    """Load the model part of a loaded sharded state (keyed as `model_sharded_state` keys it) into these chunks,
    strictly."""
    chunks = _chunks(models)
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[_chunk_key(index, len(chunks))], strict=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
