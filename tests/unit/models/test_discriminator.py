"""The discriminator (PRISM_SPEC §2.2-2.5): per-token scores equal transformers' last hidden states times the value
head, no vocabulary projection exists, the head is N(0, 0.02²) and round-trips under `v_head.1.weight`, dropout acts
only in train mode, and scores are read at the last real token whatever the padding side."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prism_mcore.config.schema import ParallelConfig
from prism_mcore.data.batching import pack_padded
from prism_mcore.models import build_discriminator, forward_kwargs, save_hf
from prism_mcore.models.discriminator import VALUE_HEAD_HF_NAME, ValueHead
from tests.unit.models.conftest import FP32_SDPA
from tests.unit.models.tiny_checkpoints import VOCAB, hf_forward, image_text_inputs, text_inputs


def _head(disc) -> torch.Tensor:
    return disc.chunks[0].language_model.output_layer.weight


@pytest.mark.parametrize("make_inputs", [image_text_inputs, text_inputs], ids=["two_images_and_text", "text_only"])
def test_scores_are_hidden_states_times_head(discriminator, hf_moe, make_inputs) -> None:
    inputs = make_inputs()
    with torch.no_grad():
        scores = discriminator.chunks[0](**inputs)
    hidden = hf_forward(hf_moe.model, inputs).last_hidden_state  # the backbone without lm_head
    assert scores.shape == (*inputs["input_ids"].shape, 1)
    assert (scores - hidden @ _head(discriminator).T).abs().max().item() <= 1e-5


def test_no_vocabulary_projection(discriminator, hf_moe) -> None:
    language_model = discriminator.chunks[0].language_model
    assert isinstance(language_model.output_layer, ValueHead)
    assert not language_model.share_embeddings_and_output_weights
    # Exactly transformers' backbone plus the head: the [vocab, hidden] lm_head is gone.
    hidden = hf_moe.config.text_config.hidden_size
    hf_count = sum(p.numel() for p in hf_moe.parameters())
    assert sum(p.numel() for p in discriminator.chunks[0].parameters()) == hf_count - VOCAB * hidden + hidden


def test_fresh_head_is_seeded_normal(runtime, moe_dir: Path, discriminator) -> None:
    head = _head(discriminator)
    assert head.shape == (1, 64)
    assert abs(head.std().item() - 0.02) < 0.006 and abs(head.mean().item()) < 0.01
    again = build_discriminator(FP32_SDPA, ParallelConfig(), path=moe_dir)  # same seed: same head on every rank
    other = build_discriminator(FP32_SDPA, ParallelConfig(), path=moe_dir, seed=1)
    assert torch.equal(_head(again), head) and not torch.equal(_head(other), head)


def test_head_round_trips_through_hf_export(runtime, moe_dir: Path, tmp_path: Path) -> None:
    trained = build_discriminator(FP32_SDPA, ParallelConfig(), path=moe_dir, seed=3)
    with torch.no_grad():
        _head(trained).mul_(5.0)  # stands for a trained head
    folder = save_hf(trained, tmp_path / "disc")
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        assert VALUE_HEAD_HF_NAME in f.keys() and "lm_head.weight" not in f.keys()
        torch.testing.assert_close(f.get_tensor(VALUE_HEAD_HF_NAME), _head(trained), rtol=0, atol=0)
    restored = build_discriminator(FP32_SDPA, ParallelConfig(), path=folder, seed=4)  # head from the file
    assert torch.equal(_head(restored), _head(trained))
    inputs = image_text_inputs()
    with torch.no_grad():
        assert torch.equal(restored.eval().chunks[0](**inputs), trained.eval().chunks[0](**inputs))


def test_dropout_only_in_train_mode(discriminator) -> None:
    inputs = text_inputs()
    with torch.no_grad():
        discriminator.eval()
        assert torch.equal(discriminator.chunks[0](**inputs), discriminator.chunks[0](**inputs))
        discriminator.train()
        noisy = [discriminator.chunks[0](**inputs) for _ in range(2)]
        discriminator.eval()
    assert not torch.equal(noisy[0], noisy[1])
    assert discriminator.chunks[0].language_model.output_layer.dropout.p == 0.1


def test_packed_scores_equal_single_sequence_scores(discriminator) -> None:
    image_text, text = image_text_inputs(), text_inputs(length=9)
    width = image_text["input_ids"].shape[1] + 1
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0, 1:], mask[0, 1:] = image_text["input_ids"][0], 1  # left padding
    ids[1, :9], mask[1, :9] = text["input_ids"][0], 1  # right padding
    batch = pack_padded(ids, mask, image_text["pixel_values"], image_text["image_grid_thw"])
    ends = batch.cu_seqlens[1:].long() - 1  # not padded to a token multiple: each sequence ends at its last token
    with torch.no_grad():
        packed = discriminator.chunks[0](**forward_kwargs(batch))[0, ends, 0]
        single = [discriminator.chunks[0](**x)[0, -1, 0] for x in (image_text, text)]
    torch.testing.assert_close(packed, torch.stack(single), rtol=0, atol=1e-6)


def test_dense_checkpoint_is_rejected(runtime, dense_dir: Path) -> None:
    with pytest.raises(ValueError, match="Qwen3-VL-MoE"):
        build_discriminator(FP32_SDPA, ParallelConfig(), path=dense_dir)
