"""Fixtures of the data tests: the embedded default's tokenizer, image processor and tiny policy; test images."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from transformers import PreTrainedTokenizerBase, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from prism_mcore.data.embedded.build import EmbeddedAssets, ensure_embedded
from prism_mcore.data.embedded.tokenizer import load_tokenizer
from prism_mcore.data.images import ImageConfig, build_image_processor, load_image_processor
from prism_mcore.data.samples import LengthLimits, SampleBuilder


@pytest.fixture(scope="session")
def embedded() -> EmbeddedAssets:
    return ensure_embedded()


@pytest.fixture(scope="session")
def tokenizer(embedded: EmbeddedAssets) -> PreTrainedTokenizerBase:
    return load_tokenizer(embedded.processor_path)


@pytest.fixture(scope="session")
def hf_image_processor(embedded: EmbeddedAssets) -> Qwen2VLImageProcessorPil:
    """The embedded processor: 16-pixel patches merged 2x2, min_pixels 32*32, max_pixels 128*128."""
    return load_image_processor(embedded.processor_path)


@pytest.fixture
def builder(tokenizer: PreTrainedTokenizerBase, hf_image_processor: Qwen2VLImageProcessorPil) -> SampleBuilder:
    return SampleBuilder(
        tokenizer, build_image_processor(hf_image_processor, ImageConfig(backend="hf")), LengthLimits()
    )


@pytest.fixture(scope="session")
def tiny_policy(embedded: EmbeddedAssets) -> Qwen3VLForConditionalGeneration:
    """The embedded default's randomly initialised Qwen3-VL policy, in eval mode (fp32, SDPA attention)."""
    return Qwen3VLForConditionalGeneration.from_pretrained(embedded.policy_path).eval()


@pytest.fixture(scope="session")
def make_image() -> Callable[..., bytes]:
    return encode_image


def encode_image(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A smooth colour gradient with noise (so resampling differences show), encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    wave = 0.5 + 0.5 * np.sin(6 * x + 3 * y + np.arange(3)[None, None, :])
    pixels = np.clip(255 * wave + rng.integers(-20, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()
