"""The one record type that carries a sample through data -> rollout -> rewards -> algorithms -> training.

A `Sample` starts life in `data/` (prompt ids, images, ground truth, teacher demonstrations), is completed by a
rollout engine (response ids, rollout log-probs, finish reason, weight version), then by `rewards/` (response text,
segment boundaries, format validity, verifiable reward) and by the discriminator and `algorithms/` (caption and CoT
scores, advantage). Every stage reads and writes these fields by name; nothing else travels between stages.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch


@dataclass
class ImageInputs:
    """Processor output for the images of one prompt, in the layout Qwen3-VL's vision tower takes.

    `pixel_values` holds the flattened patches of all images, `[sum_i t_i*h_i*w_i, C*T*P*P]`; `image_grid_thw` holds
    one `(t, h, w)` row per image in patch units (before the spatial merge).
    """

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    @cached_property
    def content_key(self) -> str:
        """A digest of the grids and pixels: equal for equal inputs, so a step can encode each distinct image once
        across its micro-batches (`models.qwen3_vl.StepImages`). Computed once per object (prompts load their
        images once)."""
        digest = hashlib.blake2b(digest_size=16)
        for tensor in (self.image_grid_thw, self.pixel_values):
            host = tensor.detach().cpu().contiguous()
            digest.update(str((host.dtype, tuple(host.shape))).encode())
            digest.update(host.view(torch.uint8).numpy().tobytes() if host.numel() else b"")
        return digest.hexdigest()


@dataclass
class SegmentBounds:
    """Where the caption and the CoT segments of a response lie, in response-token offsets (PRISM_SPEC §1).

    `caption_end` is the exclusive end of the caption segment `resp[0:caption_end]` (it ends with `</caption>`); the
    CoT segment is `resp[caption_end:valid_length]` and ends with the EOS token. `format_valid` is False when the
    response does not match the validity regex; the bounds are then the fallback split `max(1, valid_length // 2)`.
    """

    caption_end: int
    valid_length: int
    format_valid: bool


@dataclass
class Sample:
    """One prompt (and, after rollout, one response to it)."""

    # --- from data/ ---
    uid: str  # the prompt's id; the n responses to one prompt share it and form a group
    prompt_ids: list[int]
    image_inputs: ImageInputs | None = None
    images: list[bytes] = field(default_factory=list)  # encoded image files (PNG/JPEG), for remote engines
    data_source: str = ""
    ground_truth: str | None = None
    equivalent_answers: list[str] | None = None
    teacher_caption: str | None = None
    teacher_cot: str | None = None
    extra_info: dict[str, Any] = field(default_factory=dict)

    # --- from rollout/ ---
    response_ids: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (EOS or stop token) or "length"
    weight_version: int = -1

    # --- from rewards/ ---
    response_text: str = ""
    segments: SegmentBounds | None = None
    reward: float = 0.0
    accuracy: float = 0.0
    format_reward: float = 0.0

    # --- from the discriminator and algorithms/ ---
    caption_score: float = 0.0
    cot_score: float = 0.0
    advantage: float = 0.0

    @property
    def response_length(self) -> int:
        return len(self.response_ids)

    @property
    def format_valid(self) -> bool:
        return self.segments is not None and self.segments.format_valid
