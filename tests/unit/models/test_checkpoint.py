"""Model dist checkpoints (torch_dist): changed weights of the policy and of the discriminator (value head included)
come back exactly in a freshly built model. TP=2 -> TP=1 and EP=2 -> EP=1 resharding is
in tests/distributed/test_models_parallel.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prism_mcore.config.schema import ParallelConfig
from prism_mcore.models import build_discriminator, build_policy
from prism_mcore.training.checkpoint import model_sharded_state
from tests.checkpoint_support import load_model_weights, save_model_weights
from tests.unit.models.conftest import FP32_SDPA
from tests.unit.models.tiny_checkpoints import image_text_inputs


def _change(handle) -> None:
    with torch.no_grad():
        for param in handle.chunks[0].parameters():
            param.mul_(1.01).add_(0.001)


@pytest.mark.parametrize("build", [build_policy, build_discriminator], ids=["policy", "discriminator"])
def test_changed_weights_come_back(runtime, dense_dir: Path, moe_dir: Path, tmp_path: Path, build) -> None:
    source = dense_dir if build is build_policy else moe_dir
    trained = build(FP32_SDPA, ParallelConfig(), path=source).eval()
    _change(trained)
    folder = save_model_weights(trained, tmp_path / "ckpt")

    fresh = build(FP32_SDPA, ParallelConfig(), path=source).eval()
    load_model_weights(fresh, folder)
    expected = trained.chunks[0].state_dict()
    for name, tensor in fresh.chunks[0].state_dict().items():
        if isinstance(tensor, torch.Tensor):  # skips Megatron's non-tensor extra states
            assert torch.equal(tensor, expected[name]), name
    inputs = image_text_inputs()
    with torch.no_grad():
        assert torch.equal(fresh.chunks[0](**inputs), trained.chunks[0](**inputs))


def test_value_head_is_saved_under_its_megatron_name(discriminator) -> None:
    state = model_sharded_state(discriminator)["model"]
    assert state["language_model.output_layer.weight"].local_shape == (1, 64)
