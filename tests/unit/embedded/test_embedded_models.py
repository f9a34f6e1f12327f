"""The tiny checkpoints: the policy and the upcycled MoE discriminator load with transformers, take the task's images,
and agree with the tokenizer on the vocabulary and the vision and stop token ids."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import GenerationConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from prism_mcore.data.embedded import EmbeddedAssets, load_processor
from prism_mcore.data.embedded.models import DISCRIMINATOR_BASE_SIZE, POLICY_SIZE


@pytest.fixture(scope="module")
def val_inputs(assets: EmbeddedAssets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The processed first validation prompt (a 96x96 shapes image, 9 image tokens), ready for generation."""
    rows = datasets.load_dataset(
        "parquet", data_files=str(assets.val_path), split="train", cache_dir=str(tmp_path_factory.mktemp("hf"))
    )
    row = rows[0]
    processor = load_processor(assets.processor_path)
    system, user = row["prompt"]
    question = user["content"].removeprefix("<image>\n")
    messages = [
        {"role": "system", "content": system["content"]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(images=row["images"], text=[text], return_tensors="pt")


def test_policy_config_matches_tokenizer_and_size(assets: EmbeddedAssets, tokenizer) -> None:
    config = Qwen3VLForConditionalGeneration.config_class.from_pretrained(assets.policy_path)
    ids = tokenizer.convert_tokens_to_ids
    assert config.text_config.vocab_size == len(tokenizer) == 640
    assert (config.image_token_id, config.video_token_id) == (ids("<|image_pad|>"), ids("<|video_pad|>"))
    assert (config.vision_start_token_id, config.vision_end_token_id) == (
        ids("<|vision_start|>"),
        ids("<|vision_end|>"),
    )
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (128, 4, 384)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (4, 2, 32)
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert config.vision_config.out_hidden_size == text.hidden_size
    assert not config.tie_word_embeddings
    generation = GenerationConfig.from_pretrained(assets.policy_path)
    assert (generation.eos_token_id, generation.pad_token_id) == ([622, 620], 620)


def test_policy_forward_and_generate_with_an_image(assets: EmbeddedAssets, val_inputs) -> None:
    assert val_inputs["image_grid_thw"].tolist() == [[1, 6, 6]]
    model = Qwen3VLForConditionalGeneration.from_pretrained(assets.policy_path).eval()
    assert model.dtype == torch.float32
    # The notes' "M" size: about 1.5 M parameters with this vocabulary.
    assert 1_400_000 < sum(p.numel() for p in model.parameters()) < 1_500_000
    with torch.no_grad():
        logits = model(**val_inputs).logits
    assert logits.shape == (1, val_inputs["input_ids"].shape[1], 640)
    assert torch.isfinite(logits).all()
    generated = model.generate(**val_inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, val_inputs["input_ids"].shape[1] + 4)


def test_discriminator_is_an_upcycled_qwen3vl_moe(assets: EmbeddedAssets, val_inputs) -> None:
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(assets.discriminator_path).eval()
    text = model.config.text_config
    assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (4, 2, POLICY_SIZE.ffn_size)
    assert text.num_hidden_layers == DISCRIMINATOR_BASE_SIZE.num_layers == 2
    assert text.vocab_size == 640
    assert model.config.image_token_id == 632
    experts = model.model.language_model.layers[0].mlp.experts
    # Each expert is the same dense MLP plus independent noise (std 0.01): close to, but not equal to, each other.
    spread = (experts.gate_up_proj[0] - experts.gate_up_proj[1]).std().item()
    assert 0.01 < spread < 0.02  # std of the difference of two N(0, 0.01^2) draws: 0.01 * sqrt(2)
    with torch.no_grad():
        hidden = model.model(**val_inputs).last_hidden_state
    assert hidden.shape == (1, val_inputs["input_ids"].shape[1], text.hidden_size)
    assert torch.isfinite(hidden).all()
