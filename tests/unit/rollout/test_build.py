"""`build_rollout_engine`: the run's rollout config section turned into an engine and its weight sync."""

from __future__ import annotations

from pathlib import Path

import torch

from prism_mcore.config.schema import RolloutConfig
from prism_mcore.data.embedded import EmbeddedAssets
from prism_mcore.rollout import (
    DiskWeightSync,
    DistributedWeightSync,
    LocalEngine,
    SGLangEngine,
    TensorWeightSync,
    build_rollout_engine,
    build_weight_sync,
    sync_device,
    weights_for_sync,
)
from tests.unit.rollout.fake_server import fake_servers, sglang_like


def test_local_engine_from_config(embedded: EmbeddedAssets, tmp_path: Path) -> None:
    engine = build_rollout_engine(RolloutConfig(local_max_batch_size=4), embedded.policy_path, run_dir=tmp_path)
    assert isinstance(engine, LocalEngine) and engine.max_batch_size == 4 and engine.weight_version == 0


def test_sglang_engine_from_config(embedded: EmbeddedAssets, tmp_path: Path) -> None:
    vision_ids = set(LocalEngine.from_pretrained(embedded.policy_path).suppress_token_ids)
    strategies = {"tensor": TensorWeightSync, "disk": DiskWeightSync, "distributed": DistributedWeightSync}
    with fake_servers(sglang_like) as (server,):
        server.weight_version = "default"
        for transport, strategy in strategies.items():
            config = RolloutConfig(engine="sglang", server_urls=[server.url], weight_sync=transport, max_retries=5)
            # The fake servers cannot join a weight sync: the checkpoint push is tested against real servers.
            engine = build_rollout_engine(
                config, embedded.policy_path, run_dir=tmp_path, weight_version=2, load_checkpoint=False
            )
            assert isinstance(engine, SGLangEngine) and isinstance(engine.weight_sync, strategy)
            assert engine.vision_token_ids == vision_ids and engine.retry.max_retries == 5
            assert server.weight_version == "2"  # readiness labelled the server's weights with the engine's version
            engine.close()


def test_disk_sync_folder_defaults_to_the_run_folder(tmp_path: Path) -> None:
    default = build_weight_sync(RolloutConfig(weight_sync="disk"), "/ckpt/policy", run_dir=tmp_path)
    assert isinstance(default, DiskWeightSync) and default.directory == tmp_path / "rollout_weights"
    chosen = build_weight_sync(
        RolloutConfig(weight_sync="disk", weight_sync_dir="/shared/w"), "/ckpt", run_dir=tmp_path
    )
    assert chosen.directory == Path("/shared/w") and chosen.base_checkpoint == Path("/ckpt")


def test_weights_travel_from_the_device_their_sync_sends_from() -> None:
    gpu = torch.device("cuda", 1)  # only the choice is under test: nothing is allocated there
    for sync in ("tensor", "distributed"):  # CUDA IPC handles / NCCL broadcast
        assert sync_device(RolloutConfig(engine="sglang", weight_sync=sync), gpu) == gpu
    assert sync_device(RolloutConfig(engine="sglang", weight_sync="disk"), gpu) == torch.device("cpu")
    assert sync_device(RolloutConfig(engine="local"), gpu) == gpu
    assert sync_device(RolloutConfig(engine="sglang", weight_sync="tensor"), "cpu") == torch.device("cpu")
    moved = list(weights_for_sync(iter([("a", torch.ones(2))]), RolloutConfig(weight_sync="disk"), "cpu"))
    assert moved[0][0] == "a" and torch.equal(moved[0][1], torch.ones(2))
