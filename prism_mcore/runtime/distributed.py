"""Process-group and model-parallel setup, device selection and shutdown.

`init_distributed` works the same under `torchrun` (it reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT) and as a plain single process (it makes a one-rank group with an in-memory store). With CUDA it uses NCCL
and binds each rank to its local GPU; without CUDA it uses gloo and applies the CPU compatibility layer first, so the
same Megatron code runs in both places. Model-parallel groups (TP, PP, EP, CP; DP is what remains) come from
Megatron-Core's `parallel_state`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from prism_mcore.config.schema import ParallelConfig
from prism_mcore.runtime import compat
from prism_mcore.runtime.lifetime import exit_with_parent
from prism_mcore.runtime.seeding import seed_everything


@dataclass(frozen=True)
class DistEnv:
    """What a rank needs to know about its place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp: int
    pp: int
    ep: int
    cp: int
    dp: int
    dp_rank: int  # this rank's data-parallel index: which share of a global batch it trains on

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(parallel: ParallelConfig | None = None, seed: int = 42) -> DistEnv:
    """Create the process group and Megatron's model-parallel groups; idempotent within a process."""
    parallel = parallel or ParallelConfig()
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        compat.apply_cpu_patches()
    compat.install_te_import_workaround()

    launched = "RANK" in os.environ  # under torchrun; otherwise a plain `python ...` run, one rank
    if launched:
        exit_with_parent()  # torchrun starts its workers in sessions of their own: die with the launcher
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # A single process keeps its rendezvous in memory: no port to collide with a parent or sibling process,
        # and nothing written to os.environ for child processes to inherit.
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=parallel.timeout_minutes),
            **({} if launched else {"store": dist.HashStore()}),
        )

    model_parallel = parallel.tensor * parallel.pipeline * parallel.context
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor x pipeline x context = "
            f"{parallel.tensor} x {parallel.pipeline} x {parallel.context}"
        )
    dp = world_size // model_parallel
    if (dp * parallel.context) % parallel.expert:
        raise ValueError(
            f"expert parallel size {parallel.expert} must divide data x context parallel = "
            f"{dp} x {parallel.context} = {dp * parallel.context}"
        )

    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor,
            pipeline_model_parallel_size=parallel.pipeline,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
            context_parallel_size=parallel.context,
            expert_model_parallel_size=parallel.expert,
            distributed_timeout_minutes=parallel.timeout_minutes,
        )
    seed_everything(seed)
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
        backend=backend,
        tp=parallel.tensor,
        pp=parallel.pipeline,
        ep=parallel.expert,
        cp=parallel.context,
        dp=dp,
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def shutdown() -> None:
    """Tear down Megatron's groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_data_parallel(obj: Any) -> list[Any]:
    """Every data-parallel rank's `obj`, in DP-rank order (one share of work per rank, results for all)."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (work done once, on rank 0: validating prompts, rollouts, evaluation)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_from_last_stage(obj: Any) -> Any:
    """The last pipeline stage's `obj` on every stage (losses and scores exist only on the last stage)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(
        holder,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return holder[0]
