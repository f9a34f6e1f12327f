"""The embedded default's Qwen3-VL processor: image-processor settings for small images, and offline loading.

Folders are written in the released Qwen3-VL layout (tokenizer files, chat template, `preprocessor_config.json`,
`video_preprocessor_config.json`, processor class `Qwen3VLProcessor`), so `AutoProcessor.from_pretrained` loads
them wherever torchvision is installed. transformers' video processors need torchvision, which has no build for this
CPU torch; `load_processor` therefore builds `Qwen3VLImageTextProcessor`, Qwen3VLProcessor without the video
processor, on every machine, so image and text processing is the same code everywhere. Without torchvision the image
processor is the PIL one (`Qwen2VLImageProcessorPil`).

Sizes: patches of 16 pixels, 2x2 merged, so one image token covers 32x32 pixels. Qwen3-VL's default `min_pixels`
(65,536) would upscale the small task images (a 64x64 image to 64 tokens); here `min_pixels` is one merged patch
and `max_pixels` 128x128, so a 64x64 image gives 4 image tokens, 96x96 gives 9 and 112x112 gives 16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import BaseImageProcessor, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = (PATCH_SIZE * MERGE_SIZE) ** 2
MAX_PIXELS = 128 * 128
# Qwen3-VL normalises pixels to [-1, 1] (not CLIP's mean/std).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

# Qwen3-VL's video processor settings (its class defaults); the embedded task has no videos, but a complete folder
# lets AutoProcessor build the full Qwen3VLProcessor where torchvision exists.
VIDEO_PROCESSOR_CONFIG = {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "processor_class": "Qwen3VLProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(IMAGE_MEAN),
    "image_std": list(IMAGE_STD),
    "patch_size": PATCH_SIZE,
    "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    "merge_size": MERGE_SIZE,
    "do_sample_frames": True,
    "fps": 2,
    "min_frames": 4,
    "max_frames": 768,
}


class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor for images and text only: the same image-token expansion, chat template and
    `mm_token_type_ids`, without the video processor (which needs torchvision)."""

    def __init__(
        self,
        image_processor: BaseImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        # ProcessorMixin pairs positional sub-processors with this class's (image_processor, tokenizer) attributes,
        # so the parent's video-processor argument is ignored.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def image_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


def save_processor(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write the tokenizer and the image and video processor configs into `folder` (a processor or checkpoint)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    image_processor().save_pretrained(folder)
    config_path = folder / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config["processor_class"] = "Qwen3VLProcessor"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    video_path = folder / "video_preprocessor_config.json"
    video_path.write_text(json.dumps(VIDEO_PROCESSOR_CONFIG, indent=2, sort_keys=True) + "\n")


def load_processor(path: str | Path) -> Qwen3VLImageTextProcessor:
    """The image+text Qwen3-VL processor saved in a folder (processor or checkpoint), without network access."""
    return Qwen3VLImageTextProcessor.from_pretrained(str(path), local_files_only=True)
