"""Distributed runtime: process groups (NCCL or gloo), Megatron model-parallel groups, seeding, device detection,
the compatibility layer that lets the same Megatron code run without CUDA or Transformer Engine, and process
lifetime (`lifetime`: helper processes die with the process that started them)."""

from prism_mcore.runtime.distributed import (
    DistEnv,
    broadcast_from_last_stage,
    broadcast_from_main,
    default_device,
    gather_data_parallel,
    init_distributed,
    shutdown,
)
from prism_mcore.runtime.seeding import seed_everything, stage_seed

__all__ = [
    "DistEnv",
    "broadcast_from_last_stage",
    "broadcast_from_main",
    "default_device",
    "gather_data_parallel",
    "init_distributed",
    "seed_everything",
    "shutdown",
    "stage_seed",
]
