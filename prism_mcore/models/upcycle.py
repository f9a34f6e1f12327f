"""Sparse upcycling of a dense Qwen3-VL checkpoint into a Qwen3-VL-MoE discriminator backbone (PRISM_SPEC §2.1).

Every decoder MLP becomes an MoE block of `num_experts` experts with top-`top_k` routing; each expert is a copy of the
dense MLP plus independent Gaussian noise (std `noise_std`, 0.01 in PRISM), the router is drawn from N(0, router_std²)
(0.02), and everything else (vision tower, embeddings, attention, norms, lm_head) is copied bit for bit. With
`noise_std=0` every expert equals the dense MLP and top-k weights are renormalised to sum 1, so the MoE model computes
exactly the dense model's function: that is the test of this module.

This works on HF checkpoints only (transformers classes, no Megatron), so it runs anywhere, and the result is loaded
like any other HF checkpoint by `models/` (Megatron-Bridge) or by transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

# Files of a checkpoint folder that upcycling rewrites; everything else (tokenizer, processor, chat template,
# generation config) is copied unchanged so the result is a self-contained checkpoint.
_REWRITTEN = ("config.json", "model.safetensors", "model.safetensors.index.json")


def moe_config_from_dense(dense: Qwen3VLConfig, num_experts: int, top_k: int, aux_loss_coef: float) -> Qwen3VLMoeConfig:
    """The MoE config of §2.1: all dense text fields, every layer sparse, expert width = dense FFN width."""
    text = dense.text_config.to_dict()
    text.update(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=dense.text_config.intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=aux_loss_coef,
    )
    for key in ("model_type", "architectures", "transformers_version"):
        text.pop(key, None)
    vision = dense.vision_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        vision.pop(key, None)
    return Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=dense.image_token_id,
        video_token_id=dense.video_token_id,
        vision_start_token_id=dense.vision_start_token_id,
        vision_end_token_id=dense.vision_end_token_id,
        tie_word_embeddings=dense.tie_word_embeddings,
    )


def upcycle_state_dict(
    dense_state: dict[str, torch.Tensor],
    num_layers: int,
    num_experts: int,
    noise_std: float,
    router_std: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Map a dense Qwen3-VL state dict (transformers' in-memory layout) to the MoE one.

    Expert tensors use transformers' in-memory layout: `gate_up_proj[e]` is `[2I, H]` = concat(W_gate, W_up) and
    `down_proj[e]` is `[H, I]`; `save_moe_checkpoint` writes them transposed, as released checkpoints store them.
    Noise is drawn in fp32 and added before casting back, so bf16 checkpoints get the same noise as fp32 ones.
    """

    def noisy_copies(weight: torch.Tensor) -> torch.Tensor:
        base = weight.float().unsqueeze(0).expand(num_experts, *weight.shape)
        noise = torch.randn(base.shape, generator=generator) * noise_std
        return (base + noise).to(weight.dtype)

    moe_state = dict(dense_state)
    for layer in range(num_layers):
        prefix = f"model.language_model.layers.{layer}.mlp."
        gate = moe_state.pop(prefix + "gate_proj.weight")
        up = moe_state.pop(prefix + "up_proj.weight")
        down = moe_state.pop(prefix + "down_proj.weight")
        moe_state[prefix + "experts.gate_up_proj"] = noisy_copies(torch.cat([gate, up], dim=0))
        moe_state[prefix + "experts.down_proj"] = noisy_copies(down)
        hidden = gate.shape[1]
        router = torch.randn(num_experts, hidden, generator=generator) * router_std
        moe_state[prefix + "gate.weight"] = router.to(gate.dtype)
    return moe_state


def upcycle_to_moe(
    dense_dir: str | Path,
    out_dir: str | Path,
    num_experts: int = 4,
    top_k: int = 2,
    noise_std: float = 0.01,
    router_std: float = 0.02,
    aux_loss_coef: float = 0.01,
    seed: int = 42,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a Qwen3-VL-MoE HF checkpoint to `out_dir`, upcycled from the dense Qwen3-VL checkpoint in `dense_dir`.

    `dtype` defaults to the dense checkpoint's own dtype (PRISM loads its 2B source in bf16).
    """
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} must not exceed num_experts={num_experts}")
    dense = Qwen3VLForConditionalGeneration.from_pretrained(dense_dir, dtype=dtype or "auto")
    moe_config = moe_config_from_dense(dense.config, num_experts, top_k, aux_loss_coef)
    generator = torch.Generator().manual_seed(seed)
    moe_state = upcycle_state_dict(
        dense.state_dict(),
        dense.config.text_config.num_hidden_layers,
        num_experts,
        noise_std,
        router_std,
        generator,
    )
    with torch.device("meta"):
        moe = Qwen3VLMoeForConditionalGeneration(moe_config)
    moe.load_state_dict(moe_state, strict=True, assign=True)
    moe.config.dtype = dense.dtype

    out_dir.mkdir(parents=True, exist_ok=True)
    for item in dense_dir.iterdir():
        if item.is_file() and item.name not in _REWRITTEN and not item.name.startswith("model-"):
            shutil.copy2(item, out_dir / item.name)
    save_moe_checkpoint(moe, out_dir)
    return out_dir


def save_moe_checkpoint(model: Qwen3VLMoeForConditionalGeneration, out_dir: Path, max_shard_size: str = "5GB") -> None:
    """Save in the released Qwen3-VL-MoE layout: fused experts as `gate_up_proj` `[E, H, 2I]`, `down_proj` `[E, I, H]`.

    transformers 5.x keeps experts transposed in memory and would save them that way; released checkpoints (and
    PRISM_SPEC §2.1) use the layout above, which both transformers (it transposes on load) and Megatron-Bridge
    (it transposes on import and export) read, so an import/export round trip reproduces this file exactly.
    """
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied to the embedding; safetensors refuses shared storage
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensor = tensor.transpose(1, 2)
        state[name] = tensor.contiguous()
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, out_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": split.tensor_to_filename,
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(out_dir)
