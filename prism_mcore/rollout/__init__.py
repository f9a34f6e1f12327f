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
from pathlib import Path

import torch
from transformers import AutoConfig

from prism_mcore.config.schema import RolloutConfig
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
            bucket_bytes=bucket_bytes,
            timeout_s=config.request_timeout_s,
        )
    directory = Path(config.weight_sync_dir) if config.weight_sync_dir else Path(run_dir) / "rollout_weights"
    return DiskWeightSync(directory=directory, base_checkpoint=Path(policy_path))


def build_rollout_engine(
    config: RolloutConfig,
    policy_path: str | Path,
    *,
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    weight_version: int = 0,
) -> RolloutEngine:
    """The engine `config.engine` names, serving the policy checkpoint at `policy_path` (labelled `weight_version`).

    An SGLang engine waits until every server in `config.server_urls` is ready (`server_ready_timeout_s`); those
    servers must have been started with the same checkpoint.
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
    engine.wait_until_ready(config.server_ready_timeout_s)
    return engine
