"""Tiny randomly initialised Qwen3-VL checkpoints for the embedded default: the policy and the MoE discriminator.

Sizes follow the CPU speed budget (shared notes, size "M"): text hidden 128, 4 layers, FFN 384, 4 query and 2 KV
heads of 32 dims, a 2-layer vision tower of width 64 with 16-pixel patches, 2x2 merge and deepstack from both vision
layers, about 1.8 M parameters: fast enough for all three stages in minutes on 2 cores. MRoPE sections
[6, 5, 5] split the 16 rotary frequencies of a 32-dim head in Qwen3-VL's proportions ([24, 20, 20] of 64).

The discriminator is built as PRISM builds it (PRISM_SPEC §2.1): a dense Qwen3-VL, smaller than the policy (2 layers
instead of 4) and separately seeded, upcycled to 4 experts with top-2 routing by `models.upcycle.upcycle_to_moe`.
Both share the tokenizer, as PRISM requires (D consumes the policy's token ids, §8.1).

Every folder is a self-contained HF checkpoint: weights, config, generation config, tokenizer and processor files.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from prism_mcore.data.embedded.processor import MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE, save_processor
from prism_mcore.data.embedded.tokenizer import EOS_TOKEN, MODEL_MAX_LENGTH, PAD_TOKEN


@dataclass(frozen=True)
class TinyQwen3VLSize:
    """The few size fields that differ between the tiny models; everything else is fixed below."""

    hidden_size: int = 128
    num_layers: int = 4
    ffn_size: int = 384
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    mrope_section: tuple[int, int, int] = (6, 5, 5)  # sums to head_dim // 2
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_ffn_size: int = 256
    vision_heads: int = 2
    deepstack_layers: tuple[int, ...] = (0, 1)


POLICY_SIZE = TinyQwen3VLSize()
DISCRIMINATOR_BASE_SIZE = TinyQwen3VLSize(num_layers=2)
NUM_EXPERTS = 4
TOP_K = 2
EXPERT_NOISE_STD = 0.01  # PRISM_SPEC §2.1
MAX_GRID_SIDE = 8  # patches per side of the largest image (128 pixels): the learned position grid is 8x8


def qwen3vl_config(size: TinyQwen3VLSize, tokenizer: PreTrainedTokenizerBase) -> Qwen3VLConfig:
    """A Qwen3-VL config of `size` whose vocabulary and vision token ids are the tokenizer's."""
    ids = tokenizer.convert_tokens_to_ids
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": size.hidden_size,
        "intermediate_size": size.ffn_size,
        "num_hidden_layers": size.num_layers,
        "num_attention_heads": size.num_heads,
        "num_key_value_heads": size.num_kv_heads,
        "head_dim": size.head_dim,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": list(size.mrope_section),
            "mrope_interleaved": True,
        },
        "bos_token_id": ids(PAD_TOKEN),
        "eos_token_id": ids(EOS_TOKEN),
        "pad_token_id": ids(PAD_TOKEN),
    }
    vision = {
        "depth": size.vision_depth,
        "hidden_size": size.vision_hidden_size,
        "intermediate_size": size.vision_ffn_size,
        "num_heads": size.vision_heads,
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "out_hidden_size": size.hidden_size,
        "num_position_embeddings": MAX_GRID_SIDE * MAX_GRID_SIDE,
        "deepstack_visual_indexes": list(size.deepstack_layers),
    }
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Qwen3-VL's stop convention: stop at `<|im_end|>` or `<|endoftext|>`, pad with `<|endoftext|>`."""
    ids = tokenizer.convert_tokens_to_ids
    return GenerationConfig(
        bos_token_id=ids(PAD_TOKEN),
        eos_token_id=[ids(EOS_TOKEN), ids(PAD_TOKEN)],
        pad_token_id=ids(PAD_TOKEN),
    )


def save_dense_model(size: TinyQwen3VLSize, tokenizer: PreTrainedTokenizerBase, folder: Path, seed: int) -> Path:
    """A randomly initialised (seeded) dense Qwen3-VL checkpoint in fp32, with its tokenizer and processor.

    transformers initialises from the process's CPU generator: it is seeded for the build and restored afterwards,
    so a build neither depends on nor changes the random state of the run that triggered it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(qwen3vl_config(size, tokenizer)).eval()
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(folder)
    save_processor(tokenizer, folder)
    return folder


def save_policy(tokenizer: PreTrainedTokenizerBase, folder: Path, seed: int) -> Path:
    return save_dense_model(POLICY_SIZE, tokenizer, folder, seed)


def save_discriminator(tokenizer: PreTrainedTokenizerBase, folder: Path, seed: int) -> Path:
    """The dense discriminator base, seeded with `seed`, upcycled into `folder` (its noise seeded with `seed + 1`)."""
    # Imported here: `prism_mcore.models` builds on data/, which loads it only when a build upcycles.
    from prism_mcore.models.upcycle import upcycle_to_moe

    with tempfile.TemporaryDirectory(prefix="prism-dense-discriminator-") as dense_dir:
        save_dense_model(DISCRIMINATOR_BASE_SIZE, tokenizer, Path(dense_dir), seed)
        return upcycle_to_moe(
            dense_dir, folder, num_experts=NUM_EXPERTS, top_k=TOP_K, noise_std=EXPERT_NOISE_STD, seed=seed + 1
        )
