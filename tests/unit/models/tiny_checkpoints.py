"""Tiny random Qwen3-VL and Qwen3-VL-MoE HF checkpoints built locally, and the inputs the model tests feed them.

Shared by the single-process model tests and the torchrun workers. The sizes keep every real feature: GQA (4 query
heads, 2 KV heads), QK-norm, interleaved 3-D MRoPE, a 2-block vision tower with two deepstack mergers (injected into
the first two of four language layers, so a pipeline split 2+2 keeps them on the first stage), and images of
different sizes. The MoE checkpoint is upcycled with `models/upcycle.py` (4 experts, top-2), with enough expert noise
that routing matters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

VOCAB = 256
VISION_START, VISION_END, IMAGE, VIDEO = 250, 251, 252, 253
PATCH_DIM = 3 * 2 * 16 * 16  # channels x temporal patch x patch x patch

# Files a real checkpoint folder carries besides weights; export must copy them unchanged.
SIDE_FILES = {
    "tokenizer_config.json": '{"model_max_length": 4096}',
    "preprocessor_config.json": '{"patch_size": 16, "merge_size": 2}',
    "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
}


def tiny_config(tie_word_embeddings: bool = False) -> Qwen3VLConfig:
    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rope_theta=5_000_000.0,
        rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, temporal_patch_size=2,
        spatial_merge_size=2, in_channels=3, out_hidden_size=64, num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
    )  # fmt: skip
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip


def write_dense(folder: Path, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """A random dense Qwen3-VL checkpoint (fp32) with tokenizer/processor side files."""
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_config(tie_word_embeddings))
    with torch.no_grad():  # random norms and biases, so that a wrongly mapped one cannot hide behind ones/zeros
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "bias")):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    for name, text in SIDE_FILES.items():
        (folder / name).write_text(text)
    return folder


def write_moe(folder: Path, dense: Path) -> Path:
    """The dense checkpoint upcycled to Qwen3-VL-MoE: 4 experts, top-2, experts differing by N(0, 0.05²)."""
    from prism_mcore.models.upcycle import upcycle_to_moe

    return upcycle_to_moe(dense, folder, num_experts=4, top_k=2, noise_std=0.05, router_std=0.5, seed=7)


def image_text_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """One sequence with two images of different sizes (4 and 8 merged tokens) between text tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor(
        [[5, 6, VISION_START, *[IMAGE] * 4, VISION_END, 7, 8, VISION_START, *[IMAGE] * 8, VISION_END, 9, 10, 11]]
    )
    grid = torch.tensor([[1, 4, 4], [1, 4, 8]])
    pixels = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=generator)
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid}


def text_inputs(seed: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VISION_START, (1, length), generator=generator)}


def hf_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor], grad: bool = False, **kwargs) -> object:
    """A transformers forward on our input dicts (transformers 5 wants the image-token type ids with images)."""
    extra = {"mm_token_type_ids": (inputs["input_ids"] == IMAGE).long()} if "pixel_values" in inputs else {}
    with torch.set_grad_enabled(grad):
        return model(**inputs, **extra, **kwargs)
