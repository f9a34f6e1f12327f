"""HF export: the `(hf_name, tensor)` stream reproduces the source checkpoint bit for bit (dense, and MoE with fused
experts), and `save_hf` writes a folder transformers loads with the Megatron model's logits, side files included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3VLForConditionalGeneration

from prism_mcore.config.schema import ParallelConfig
from prism_mcore.models import build_policy, iter_hf_weights, save_hf
from tests.unit.models.conftest import FP32_SDPA
from tests.unit.models.tiny_checkpoints import SIDE_FILES, hf_forward, image_text_inputs


def _assert_round_trip(handle, source_dir: Path) -> None:
    source = load_file(source_dir / "model.safetensors")
    exported = list(iter_hf_weights(handle))
    names = [name for name, _ in exported]
    assert len(names) == len(set(names)) and sorted(names) == sorted(source)
    for name, tensor in exported:
        assert tensor.dtype == source[name].dtype and torch.equal(tensor, source[name]), name


def test_dense_round_trip_is_bit_exact(policy, dense_dir: Path) -> None:
    _assert_round_trip(policy, dense_dir)


def test_moe_round_trip_keeps_fused_experts(runtime, moe_dir: Path) -> None:
    handle = build_policy(FP32_SDPA, ParallelConfig(), path=moe_dir)
    _assert_round_trip(handle, moe_dir)
    assert any(name.endswith("mlp.experts.gate_up_proj") for name, _ in iter_hf_weights(handle))


@pytest.fixture(scope="module")
def changed_policy(runtime, dense_dir: Path):
    handle = build_policy(FP32_SDPA, ParallelConfig(), path=dense_dir).eval()
    with torch.no_grad():  # stands for training: the export must carry the new weights, not the source's
        for param in handle.chunks[0].parameters():
            param.mul_(1.01).add_(0.001)
    return handle


@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 200_000], ids=["one_file", "sharded"])
def test_save_hf_loads_in_transformers_with_same_logits(changed_policy, dense_dir: Path, tmp_path: Path, shard_bytes):
    folder = save_hf(changed_policy, tmp_path / "export", max_shard_bytes=shard_bytes)
    assert not (tmp_path / "export.tmp").exists()
    for name, text in SIDE_FILES.items():
        assert (folder / name).read_text() == text
    assert json.loads((folder / "config.json").read_text()) == json.loads((dense_dir / "config.json").read_text())
    if shard_bytes < 2**20:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = image_text_inputs()
    with torch.no_grad():
        ours = changed_policy.chunks[0](**inputs)
    assert (hf_forward(reloaded, inputs).logits - ours).abs().max().item() <= 1e-5


def test_save_hf_replaces_an_existing_folder(changed_policy, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "stale.safetensors").write_text("old")
    save_hf(changed_policy, folder)
    assert not (folder / "stale.safetensors").exists() and (folder / "model.safetensors").exists()
