"""Rollouts: the `RolloutEngine` interface, its two engines and the weight sync that keeps them on the policy.

- `LocalEngine`: transformers Qwen3-VL in the trainer process (the embedded default, tests, small GPU runs), fed the
  policy's weights through the streaming HF export after every update.
- `SGLangEngine`: SGLang servers over HTTP (production), colocated (`weight_sync="tensor"`, with memory
  release/resume around training) or on other nodes (`"distributed"` through a process group, or `"disk"`).
- `python -m prism_mcore.rollout.server`: an SGLang-protocol server backed by LocalEngine, to develop and test the
  SGLang path where SGLang cannot run.

`build_rollout_engine` turns the run's `RolloutConfig` into the engine.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from transformers import AutoConfig

from prism_mcore.config.schema import RolloutConfig
from prism_mcore.hf_checkpoint import read_hf_weights
from prism_mcore.rollout.base import RolloutEngine, RolloutError, SamplingParams, config_vision_token_ids
from prism_mcore.rollout.endpoint import RetryPolicy
from prism_mcore.rollout.local import LocalEngine
from prism_mcore.rollout.sglang_engine import SGLangEngine
from prism_mcore.rollout.weight_sync import (
    DiskWeightSync,
    DistributedWeightSync,
    TensorWeightSync,
    WeightSync,
    WeightSyncError,
)

__all__ = [
    "DiskWeightSync",
    "DistributedWeightSync",
    "LocalEngine",
    "RetryPolicy",
    "RolloutEngine",
    "RolloutError",
    "SGLangEngine",
    "SamplingParams",
    "TensorWeightSync",
    "WeightSync",
    "WeightSyncError",
    "build_rollout_engine",
    "sync_device",
    "weights_for_sync",
    "build_weight_sync",
]


def build_weight_sync(config: RolloutConfig, policy_path: str | Path, run_dir: str | Path) -> WeightSync:
    """The `config.weight_sync` strategy; disk sync writes under `weight_sync_dir` or `<run_dir>/rollout_weights`."""
    bucket_bytes = config.weight_sync_bucket_mb * 1024**2
    if config.weight_sync == "tensor":
        return TensorWeightSync(bucket_bytes=bucket_bytes)
    if config.weight_sync == "distributed":
        return DistributedWeightSync(
            master_address=config.weight_sync_master_address or socket.gethostname(),
            master_port=config.weight_sync_master_port,
            backend="nccl" if torch.cuda.is_available() else "gloo",  # CPU servers (the project's) join gloo groups
            bucket_bytes=bucket_bytes,
            timeout_s=config.request_timeout_s,
        )
    directory = Path(config.weight_sync_dir) if config.weight_sync_dir else Path(run_dir) / "rollout_weights"
    return DiskWeightSync(directory=directory, base_checkpoint=Path(policy_path))


def weights_for_sync(
    named_tensors: Iterable[tuple[str, torch.Tensor]], config: RolloutConfig, device: str | torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream on the device its weight sync sends from (`sync_device`)."""
    target = sync_device(config, device)
    for name, tensor in named_tensors:
        yield name, tensor.to(target)


def sync_device(config: RolloutConfig, device: str | torch.device) -> torch.device:
    """Where weights must be to reach the engine: SGLang's tensor sync passes CUDA IPC handles and its distributed
    sync broadcasts over NCCL, so on a GPU both need CUDA tensors (as does the local engine's copy); disk sync
    writes from host memory; without a GPU everything stays on the host."""
    target = torch.device(device)
    if target.type != "cuda" or (config.engine == "sglang" and config.weight_sync == "disk"):
        return torch.device("cpu")
    return target


def build_rollout_engine(
    config: RolloutConfig,
    policy_path: str | Path,
    *,
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    weight_version: int = 0,
    load_checkpoint: bool = True,
) -> RolloutEngine:
    """The engine `config.engine` names, serving the policy checkpoint at `policy_path` (labelled `weight_version`).

    An SGLang engine waits until every server in `config.server_urls` is ready (`server_ready_timeout_s`), then
    (with `load_checkpoint`) loads `policy_path`'s weights into them through the configured weight sync: the servers
    may have been started from any checkpoint of the same architecture (the run's first, or an earlier stage's),
    and each stage's engine still samples from the checkpoint that stage starts from.
    """
    if config.engine == "local":
        return LocalEngine.from_pretrained(
            policy_path, device=device, max_batch_size=config.local_max_batch_size, weight_version=weight_version
        )
    engine = SGLangEngine(
        config.server_urls,
        weight_sync=build_weight_sync(config, policy_path, run_dir),
        request_timeout_s=config.request_timeout_s,
        retry=RetryPolicy(max_retries=config.max_retries, backoff_s=config.retry_backoff_s),
        max_concurrency=config.max_concurrent_requests,
        vision_token_ids=config_vision_token_ids(AutoConfig.from_pretrained(str(policy_path), local_files_only=True)),
        weight_version=weight_version,
    )
    try:
        engine.wait_until_ready(config.server_ready_timeout_s)
        if load_checkpoint:
            engine.update_weights(weights_for_sync(read_hf_weights(policy_path), config, device), weight_version)
    except BaseException:
        engine.close()  # its request threads, connections and any weight-sync group it opened
        raise
    return engine
