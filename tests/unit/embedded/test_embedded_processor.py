"""The embedded processor: image-token counts for the task's image sizes, Qwen3-VL pixel normalisation, offline
loading from every folder, and a folder layout that AutoProcessor reads as a full Qwen3VLProcessor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessorInitKwargs

from prism_mcore.data.embedded import EmbeddedAssets, load_processor
from prism_mcore.data.embedded.processor import Qwen3VLImageTextProcessor

IMAGE_PAD = 632


@pytest.fixture(scope="module")
def processor(assets: EmbeddedAssets) -> Qwen3VLImageTextProcessor:
    return load_processor(assets.processor_path)


def _process(processor: Qwen3VLImageTextProcessor, image: Image.Image) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt")


@pytest.mark.parametrize(
    ("width", "height", "grid", "image_tokens"),
    [
        (64, 64, [1, 4, 4], 4),  # no upscaling to Qwen3-VL's default 65,536-pixel minimum
        (112, 112, [1, 8, 8], 16),  # 112 rounds to 128 = 4 merged patches of 32 pixels per side
        (96, 64, [1, 4, 6], 6),  # the digits canvas: (h, w) = (64, 96)
        (96, 96, [1, 6, 6], 9),  # the shapes canvas
        (256, 256, [1, 8, 8], 16),  # capped by max_pixels = 128x128
    ],
)
def test_image_token_counts(processor, width: int, height: int, grid: list[int], image_tokens: int) -> None:
    inputs = _process(processor, Image.new("RGB", (width, height), (10, 20, 30)))
    assert inputs["image_grid_thw"].tolist() == [grid]
    assert int((inputs["input_ids"] == IMAGE_PAD).sum()) == image_tokens
    assert inputs["pixel_values"].shape == (grid[1] * grid[2], 3 * 2 * 16 * 16)
    assert int(inputs["mm_token_type_ids"].sum()) == image_tokens


def test_pixels_are_normalised_to_unit_range(processor) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    inputs = _process(processor, Image.fromarray(pixels))
    # The first patch row is the top-left 16x16 patch, as (channel, frame, y, x); the still image fills both frames.
    first_patch = inputs["pixel_values"][0].reshape(3, 2, 16, 16)
    expected = torch.from_numpy(pixels[:16, :16].astype(np.float32) / 255.0 * 2.0 - 1.0).permute(2, 0, 1)
    torch.testing.assert_close(first_patch[:, 0], expected)
    torch.testing.assert_close(first_patch[:, 1], expected)


def test_processor_loads_offline_from_every_folder(assets: EmbeddedAssets, processor) -> None:
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)  # no torchvision here
    for folder in (assets.policy_path, assets.discriminator_path):
        loaded = load_processor(folder)
        assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
        assert loaded.chat_template == processor.chat_template


def test_folder_declares_a_full_qwen3vl_processor(assets: EmbeddedAssets) -> None:
    image_config = json.loads((assets.processor_path / "preprocessor_config.json").read_text())
    assert image_config["processor_class"] == "Qwen3VLProcessor"
    assert image_config["image_processor_type"] == "Qwen2VLImageProcessor"
    assert image_config["size"] == {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}
    assert (image_config["patch_size"], image_config["merge_size"], image_config["temporal_patch_size"]) == (16, 2, 2)
    video_config = json.loads((assets.processor_path / "video_preprocessor_config.json").read_text())
    assert video_config["video_processor_type"] == "Qwen3VLVideoProcessor"
    # Every setting is one Qwen3VLVideoProcessor accepts (it cannot be built here: it needs torchvision).
    accepted = Qwen3VLVideoProcessorInitKwargs.__required_keys__ | Qwen3VLVideoProcessorInitKwargs.__optional_keys__
    assert set(video_config) - {"video_processor_type", "processor_class"} <= accepted
