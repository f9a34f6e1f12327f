"""Upcycling (PRISM_SPEC §2.1): exact copies at zero noise, the configured noise and router statistics otherwise."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from prism_mcore.models.upcycle import upcycle_to_moe

IMAGE, VIDEO, VSTART, VEND = 250, 251, 248, 249


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    text = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
    )  # fmt: skip
    vision = dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, temporal_patch_size=2,
        spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0],
    )  # fmt: skip
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=False,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("dense")
    Qwen3VLForConditionalGeneration(config).save_pretrained(out)
    return out


def _image_text_inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.tensor([[5, 6, VSTART] + [IMAGE] * 4 + [VEND, 7, 9, 11]])
    return dict(
        input_ids=ids,
        pixel_values=torch.randn(16, 3 * 2 * 16 * 16),
        image_grid_thw=torch.tensor([[1, 4, 4]]),
        mm_token_type_ids=(ids == IMAGE).long(),
    )


def test_zero_noise_moe_equals_dense(dense_dir: Path, tmp_path: Path) -> None:
    moe_dir = upcycle_to_moe(dense_dir, tmp_path / "moe", num_experts=4, top_k=2, noise_std=0.0)
    dense = Qwen3VLForConditionalGeneration.from_pretrained(dense_dir).eval()
    moe = Qwen3VLMoeForConditionalGeneration.from_pretrained(moe_dir).eval()
    assert moe.config.text_config.num_experts == 4
    assert moe.config.text_config.num_experts_per_tok == 2
    assert moe.config.text_config.moe_intermediate_size == 96
    assert moe.config.text_config.mlp_only_layers == []
    assert moe.config.text_config.router_aux_loss_coef == 0.01
    with torch.no_grad():
        dense_logits = dense(**_image_text_inputs()).logits
        moe_logits = moe(**_image_text_inputs()).logits
    torch.testing.assert_close(moe_logits, dense_logits, atol=1e-5, rtol=0)


def test_noise_router_and_copied_weights(dense_dir: Path, tmp_path: Path) -> None:
    moe_dir = upcycle_to_moe(dense_dir, tmp_path / "moe", num_experts=4, top_k=2, noise_std=0.01, seed=3)
    dense = Qwen3VLForConditionalGeneration.from_pretrained(dense_dir).state_dict()
    prefix = "model.language_model.layers.0.mlp."
    with safe_open(moe_dir / "model.safetensors", "pt") as f:
        gate_up = f.get_tensor(prefix + "experts.gate_up_proj")  # released layout [E, H, 2I]
        down = f.get_tensor(prefix + "experts.down_proj")  # [E, I, H]
        router = f.get_tensor(prefix + "gate.weight")
        copied = f.get_tensor("model.visual.blocks.0.attn.qkv.weight")
        embed = f.get_tensor("model.language_model.embed_tokens.weight")
    assert gate_up.shape == (4, 64, 192) and down.shape == (4, 96, 64) and router.shape == (4, 64)
    dense_gate_up = torch.cat([dense[prefix + "gate_proj.weight"], dense[prefix + "up_proj.weight"]]).T
    noise = gate_up - dense_gate_up
    assert abs(noise.std().item() - 0.01) < 1e-3 and abs(noise.mean().item()) < 1e-3
    assert not torch.equal(noise[0], noise[1])  # each expert has its own noise
    assert abs((down - dense[prefix + "down_proj.weight"].T).std().item() - 0.01) < 1e-3
    assert abs(router.std().item() - 0.02) < 4e-3
    assert torch.equal(copied, dense["model.visual.blocks.0.attn.qkv.weight"])
    assert torch.equal(embed, dense["model.language_model.embed_tokens.weight"])
