"""Weight sync strategies: bucketing of the export stream, the request sequences each strategy sends (begin/end
wrapping kept even when an update fails), the distributed group's payloads, and disk checkpoints transformers loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from prism_mcore.data.embedded import EmbeddedAssets
from prism_mcore.rollout import DiskWeightSync, DistributedWeightSync, TensorWeightSync, WeightSyncError
from prism_mcore.rollout.endpoint import SGLangEndpoint
from prism_mcore.rollout.protocol import deserialize_named_tensors
from prism_mcore.rollout.weight_sync import buckets
from tests.rollout_support import perturbed_weights
from tests.unit.rollout.fake_server import Answer, FakeServer, fake_servers, sglang_like


def _tensor(numel: int) -> torch.Tensor:
    return torch.zeros(numel, dtype=torch.float32)  # 4 bytes per element


def test_buckets_respect_the_byte_budget_and_flag_the_last() -> None:
    stream = [("a", _tensor(10)), ("b", _tensor(10)), ("c", _tensor(30)), ("d", _tensor(5))]
    grouped = [([name for name, _ in bucket], last) for bucket, last in buckets(iter(stream), bucket_bytes=80)]
    assert grouped == [(["a", "b"], False), (["c"], False), (["d"], True)]  # "c" alone exceeds the budget
    assert [last for _, last in buckets(iter(stream[:1]), 80)] == [True]
    with pytest.raises(WeightSyncError, match="yielded no tensors"):
        list(buckets(iter([]), 80))


def _endpoints(servers: list[FakeServer]) -> list[SGLangEndpoint]:
    return [SGLangEndpoint(server.url, timeout_s=5.0) for server in servers]


def test_tensor_sync_sends_buckets_per_tp_rank_inside_a_session() -> None:
    def two_ranks(server: FakeServer, path: str, body: Any) -> Answer:
        return Answer(body={"tp_size": 2}) if path == "/server_info" else sglang_like(server, path, body)

    stream = [("x", torch.randn(8)), ("y", torch.randn(8)), ("z", torch.randn(8))]
    with fake_servers(two_ranks, sglang_like) as servers:
        TensorWeightSync(bucket_bytes=64).push(_endpoints(servers), iter(stream), "9")
    for server, tp_size in zip(servers, (2, 1), strict=True):
        updates = [body for path, body in server.requests if path == "/update_weights_from_tensor"]
        assert server.paths() == [
            "/server_info",
            "/begin_weight_update",
            *["/update_weights_from_tensor"] * 2,
            "/end_weight_update",
        ]
        assert [len(body["serialized_named_tensors"]) for body in updates] == [tp_size, tp_size]
        assert [body.get("weight_version") for body in updates] == [None, "9"]  # labelled with the last bucket
        assert all(body["flush_cache"] is False for body in updates)
        received = [pair for body in updates for pair in deserialize_named_tensors(body["serialized_named_tensors"][0])]
        assert [name for name, _ in received] == ["x", "y", "z"]
        assert all(torch.equal(got, sent) for (_, got), (_, sent) in zip(received, stream, strict=True))


def test_a_failed_update_still_closes_the_session() -> None:
    def refusing(server: FakeServer, path: str, body: Any) -> Answer:
        if path == "/update_weights_from_tensor":
            return Answer(400, {"success": False, "message": "Failed to update weights: shape mismatch"})
        return sglang_like(server, path, body)

    with fake_servers(sglang_like, refusing) as servers:
        with pytest.raises(WeightSyncError, match=r"http://127.0.0.1:\d+/update_weights_from_tensor: HTTP 400 Failed"):
            TensorWeightSync().push(_endpoints(servers), iter([("x", torch.ones(2))]), "1")
    assert all(server.paths()[-1] == "/end_weight_update" for server in servers)


def test_a_session_that_cannot_open_everywhere_is_closed_where_it_opened() -> None:
    def busy(server: FakeServer, path: str, body: Any) -> Answer:
        if path == "/begin_weight_update":
            return Answer(400, {"success": False, "message": "a weight-update session is already open"})
        return sglang_like(server, path, body)

    with fake_servers(sglang_like, busy) as servers:
        with pytest.raises(WeightSyncError, match="already open"):
            TensorWeightSync().push(_endpoints(servers), iter([("x", torch.ones(2))]), "1")
    assert servers[0].paths() == ["/server_info", "/begin_weight_update", "/end_weight_update"]
    assert "/end_weight_update" not in servers[1].paths()


def test_distributed_sync_payloads_place_every_server_rank_in_one_group() -> None:
    sync = DistributedWeightSync(master_address="10.0.0.1", master_port=29600, group_name="g")
    payloads = sync.init_payloads([2, 1, 4])
    assert [(p["rank_offset"], p["world_size"]) for p in payloads] == [(1, 8), (3, 8), (4, 8)]
    assert all(
        p["master_address"] == "10.0.0.1" and p["backend"] == "nccl" and p["group_name"] == "g" for p in payloads
    )
    bucket = [("a", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b", torch.zeros(4))]
    assert sync.update_payload(bucket, "7") == {
        "names": ["a", "b"],
        "dtypes": ["bfloat16", "float32"],
        "shapes": [[2, 3], [4]],
        "group_name": "g",
        "flush_cache": False,
        "weight_version": "7",
    }
    assert "weight_version" not in sync.update_payload(bucket, None)


def test_disk_sync_writes_a_checkpoint_transformers_loads(embedded: EmbeddedAssets, tmp_path: Path) -> None:
    model = Qwen3VLForConditionalGeneration.from_pretrained(embedded.policy_path)
    new_weights = dict(model.state_dict())
    new_weights.update(perturbed_weights(model, seed=2))
    sync = DiskWeightSync(directory=tmp_path / "sync", base_checkpoint=embedded.policy_path)
    with fake_servers(sglang_like) as servers:
        sync.push(_endpoints(servers), iter(new_weights.items()), "1")
        sync.push(_endpoints(servers), iter(new_weights.items()), "2")
    posted = [body for path, body in servers[0].requests if path == "/update_weights_from_disk"]
    assert [body["weight_version"] for body in posted] == ["1", "2"]
    assert posted[1] == {
        "model_path": str((tmp_path / "sync" / "weights_v2").resolve()),
        "weight_version": "2",
        "flush_cache": False,
    }
    assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == ["weights_v2"]  # the old version is removed
    folder = tmp_path / "sync" / "weights_v2"
    assert {"config.json", "tokenizer.json", "preprocessor_config.json", "model.safetensors.index.json"} <= {
        p.name for p in folder.iterdir()
    }
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(folder).state_dict()
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in new_weights.items())
