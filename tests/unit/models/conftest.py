"""Fixtures of the model tests: one single-rank Megatron runtime per session, tiny HF checkpoints, transformers
references. Models are fp32 on the SDPA backend, so Megatron and transformers agree to fp32 rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prism_mcore.config.schema import ModelConfig, ParallelConfig
from tests.unit.models.tiny_checkpoints import write_dense, write_moe

FP32_SDPA = ModelConfig(dtype="float32", attention_backend="sdpa")


@pytest.fixture(scope="session")
def runtime() -> None:
    """Process group and Megatron model-parallel groups of one rank (TP = PP = EP = 1)."""
    from prism_mcore.runtime import init_distributed

    init_distributed(ParallelConfig(), seed=0)


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dense")
    return write_dense(folder)


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory: pytest.TempPathFactory, dense_dir: Path) -> Path:
    return write_moe(tmp_path_factory.mktemp("moe"), dense_dir)


@pytest.fixture(scope="session")
def hf_dense(dense_dir: Path) -> torch.nn.Module:
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(
        dense_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="session")
def hf_moe(moe_dir: Path) -> torch.nn.Module:
    from transformers import Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration.from_pretrained(
        moe_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def policy(runtime: None, dense_dir: Path):
    """The dense policy, in eval mode; tests that change its weights build their own."""
    from prism_mcore.models import build_policy

    return build_policy(FP32_SDPA, ParallelConfig(), path=dense_dir).eval()


@pytest.fixture(scope="module")
def discriminator(runtime: None, moe_dir: Path):
    from prism_mcore.models import build_discriminator

    return build_discriminator(FP32_SDPA, ParallelConfig(), path=moe_dir).eval()
