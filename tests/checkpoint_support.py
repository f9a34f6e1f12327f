"""Model weights alone through Megatron's distributed checkpoint format, for tests that reshard or round-trip them
(the trainer saves models with their optimizer: `training.resume.CheckpointManager`)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from prism_mcore.training.checkpoint import Models, dist_load, dist_save, load_model_state, model_sharded_state


def save_model_weights(models: Models, directory: Path) -> Path:
    """Every rank's shards of the model weights into `directory` (collective)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        directory.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    dist_save(model_sharded_state(models), directory)
    if dist.is_initialized():
        dist.barrier()
    return directory


def load_model_weights(models: Models, directory: Path | str) -> None:
    """Weights saved by `save_model_weights`, in any parallel layout, into these chunks (strictly)."""
    load_model_state(models, dist_load(model_sharded_state(models), Path(directory)))
