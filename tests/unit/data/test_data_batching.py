"""Packing, padding and token-budget batching; packed and padded batches give transformers' Qwen3-VL the same loss."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from prism_mcore.data.batching import (
    pack_padded,
    pack_sequences,
    pack_token_ids,
    token_budget_batches,
    unpack_to_padded,
)
from prism_mcore.data.readers import ChatMessage, RowOrigin, SftExample
from prism_mcore.data.samples import IGNORE_INDEX, SampleBuilder, TokenSequence
from prism_mcore.record import ImageInputs


def toy(
    ids: list[int], labels: list[int] | None = None, images: int = 0, score_index: int | None = None
) -> TokenSequence:
    """A hand-made sequence: positions 10*i + row so every row and token is distinguishable; `images` 1x2x2 grids."""
    length = len(ids)
    positions = torch.stack([torch.arange(length) * 10 + row for row in range(3)])
    image_inputs = None
    if images:
        pixel_values = torch.arange(images * 4 * 2, dtype=torch.float32).reshape(images * 4, 2) + ids[0] * 100
        image_inputs = ImageInputs(pixel_values, torch.tensor([[1, 2, 2]] * images))
    return TokenSequence(
        input_ids=torch.tensor(ids),
        position_ids=positions,
        labels=None if labels is None else torch.tensor(labels),
        image_inputs=image_inputs,
        score_index=score_index,
    )


def test_pack_concatenates_sequences_with_boundaries() -> None:
    first = toy([1, 2, 3], [IGNORE_INDEX, 2, 3], images=1, score_index=2)
    second = toy([4, 5], None, images=0, score_index=0)
    third = toy([6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 8, 9], images=2, score_index=3)
    batch = pack_sequences([first, second, third])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert (batch.max_seqlen, batch.num_sequences, batch.num_tokens) == (4, 3, 9)
    # Each sequence keeps its own positions (restarting at 0), for all three MRoPE rows.
    assert batch.position_ids.shape == (3, 1, 9)
    assert batch.position_ids[0, 0].tolist() == [0, 10, 20, 0, 10, 0, 10, 20, 30]
    assert batch.position_ids[2, 0].tolist() == [2, 12, 22, 2, 12, 2, 12, 22, 32]
    assert batch.sequence_position_ids().tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch.hf_position_ids().shape == (4, 1, 9)
    assert batch.labels.tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9]]
    assert batch.loss_mask.sum().item() == 4
    # Shifted: position t holds the label of t+1 within the same sequence; each sequence's last token has none.
    assert batch.next_token_labels().tolist() == [
        [2, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9, IGNORE_INDEX]
    ]
    assert batch.score_indices.tolist() == [2, 3, 8]
    # Images in sequence order: first's one image, then third's two.
    assert batch.image_grid_thw.tolist() == [[1, 2, 2]] * 3
    assert torch.equal(
        batch.pixel_values, torch.cat([first.image_inputs.pixel_values, third.image_inputs.pixel_values])
    )


def test_padding_to_a_multiple_extends_the_last_sequence_without_a_loss() -> None:
    first = toy([1, 2, 3], [IGNORE_INDEX, 2, 3], images=1, score_index=2)
    second = toy([4, 5], [IGNORE_INDEX, 5], images=0, score_index=1)
    batch = pack_sequences([first, second])
    assert batch.padded_to_multiple(5, pad_token_id=0) is batch  # 5 tokens already
    padded = batch.padded_to_multiple(4, pad_token_id=0)
    assert padded.input_ids.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert padded.labels.tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5] + [IGNORE_INDEX] * 3]
    assert padded.cu_seqlens.tolist() == [0, 3, 8] and padded.cu_seqlens.dtype == torch.int32
    assert (padded.num_sequences, padded.max_seqlen) == (2, 5)
    assert padded.score_indices.tolist() == [2, 4]
    # The padding continues the last sequence as text: one past its largest last position (12), on all three rows.
    assert padded.position_ids[:, 0].tolist() == [[0, 10, 20, 0, 10, 13, 14, 15], [1, 11, 21, 1, 11, 13, 14, 15],
                                                  [2, 12, 22, 2, 12, 13, 14, 15]]  # fmt: skip
    assert torch.equal(padded.pixel_values, batch.pixel_values)
    # Packed without positions (the model derives them), the padding is plain tokens of the last sequence.
    bare = pack_token_ids([torch.tensor([7, 8, 9])]).padded_to_multiple(2, pad_token_id=1)
    assert bare.input_ids.tolist() == [[7, 8, 9, 1]] and bare.position_ids is None


def test_packed_token_ids_leave_positions_to_the_model_and_shift_targets_within_sequences() -> None:
    images = ImageInputs(torch.ones(4, 2), torch.tensor([[1, 2, 2]]))
    batch = pack_token_ids([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], [None, images])
    assert batch.cu_seqlens.tolist() == [0, 3, 5] and batch.max_seqlen == 3
    assert batch.position_ids is None and not batch.loss_mask.any()
    assert torch.equal(batch.image_grid_thw, images.image_grid_thw)
    targets, valid = batch.next_token_targets()
    assert targets.tolist() == [[2, 3, 0, 5, 0]]
    assert valid.tolist() == [[True, True, False, True, False]]
    with pytest.raises(ValueError, match="empty sequence"):
        pack_token_ids([torch.tensor([1]), torch.tensor([], dtype=torch.long)])


def test_pack_padded_takes_any_padding_side_and_unpacks_back() -> None:
    ids = torch.tensor([[0, 0, 1, 2], [3, 4, 5, 0]])  # left-padded, then right-padded
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    batch = pack_padded(ids, mask)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5]] and batch.cu_seqlens.tolist() == [0, 2, 5]
    restored = unpack_to_padded(batch.input_ids.unsqueeze(-1).float(), mask, fill=-1.0)
    assert restored.squeeze(-1).tolist() == [[-1, -1, 1, 2], [3, 4, 5, -1]]


def test_a_batch_mixing_scored_and_unscored_sequences_is_refused() -> None:
    with pytest.raises(ValueError, match="score index"):
        pack_sequences([toy([1, 2], score_index=1), toy([3])])


def test_token_budget_batches_packed_first_fit_decreasing() -> None:
    # Longest first: 8 -> [8]; 6 -> new; 5 -> new; 3 joins 6 (9); 2 joins 8 (10).
    assert token_budget_batches([5, 3, 8, 2, 6], max_tokens=10) == [[2, 3], [4, 1], [0]]


def test_token_budget_batches_rejects_a_sequence_over_the_budget() -> None:
    with pytest.raises(ValueError, match="11 tokens"):
        token_budget_batches([3, 11], max_tokens=10)


@pytest.fixture
def sft_sequences(builder: SampleBuilder, make_image: Callable[..., bytes]) -> list[TokenSequence]:
    """Three SFT sequences: one image, two images of different sizes, no image; one of them two-turn."""
    answer = "<caption>\n- shapes\n</caption>\n<think>\n2 + 1 = 3\n</think>\n<answer>\n3\n</answer>"
    conversations = [
        ([ChatMessage("user", "<image>\nHow many?\n"), ChatMessage("assistant", answer)], [make_image(64, 96)]),
        (
            [
                ChatMessage("user", "<image>\nLeft.\n<image>\nRight. Which has more?\n"),
                ChatMessage("assistant", answer),
                ChatMessage("user", "Why?"),
                ChatMessage("assistant", "Three is more than two."),
            ],
            [make_image(128, 64, seed=1), make_image(64, 64, seed=2)],
        ),
        ([ChatMessage("user", "What is 2 + 1?"), ChatMessage("assistant", answer)], []),
    ]
    return [
        builder.sft_sequence(SftExample(RowOrigin("sft.jsonl", row), messages, images))
        for row, (messages, images) in enumerate(conversations)
    ]


def test_packed_padded_and_separate_forwards_give_the_same_loss(
    tiny_policy: Qwen3VLForConditionalGeneration, builder: SampleBuilder, sft_sequences: list[TokenSequence]
) -> None:
    """The token-mean SFT loss of transformers' Qwen3-VL over three sequences, computed three ways: one forward
    per sequence (summed, then divided by all targets), one right-padded forward with an attention mask, and one
    packed forward whose per-sequence position reset keeps attention within each sequence."""
    with torch.no_grad():
        total, targets, separate_logits = 0.0, 0, []
        for sequence in sft_sequences:
            images = sequence.image_inputs
            output = tiny_policy(
                input_ids=sequence.input_ids.unsqueeze(0),
                position_ids=sequence.position_ids.unsqueeze(1),
                pixel_values=None if images is None else images.pixel_values,
                image_grid_thw=None if images is None else images.image_grid_thw,
                labels=sequence.labels.unsqueeze(0),
            )
            count = int((sequence.labels != IGNORE_INDEX).sum())
            total += output.loss.item() * count
            targets += count
            separate_logits.append(output.logits[0])
        separate_loss = total / targets

        longest = max(len(sequence) for sequence in sft_sequences)
        padded_ids = torch.full((len(sft_sequences), longest), builder.pad_id)
        attention_mask = torch.zeros(len(sft_sequences), longest, dtype=torch.long)
        positions = torch.zeros(3, len(sft_sequences), longest, dtype=torch.long)
        padded_labels = torch.full((len(sft_sequences), longest), IGNORE_INDEX)
        for row, sequence in enumerate(sft_sequences):
            size = len(sequence)
            padded_ids[row, :size], attention_mask[row, :size] = sequence.input_ids, 1
            positions[:, row, :size], padded_labels[row, :size] = sequence.position_ids, sequence.labels
        images = [sequence.image_inputs for sequence in sft_sequences if sequence.image_inputs is not None]
        padded_loss = tiny_policy(
            input_ids=padded_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            pixel_values=torch.cat([image.pixel_values for image in images]),
            image_grid_thw=torch.cat([image.image_grid_thw for image in images]),
            labels=padded_labels,
        ).loss.item()

        packed = pack_sequences(sft_sequences)
        packed_output = tiny_policy(
            input_ids=packed.input_ids,
            position_ids=packed.hf_position_ids(),
            pixel_values=packed.pixel_values,
            image_grid_thw=packed.image_grid_thw,
            labels=packed.labels,
            use_cache=False,  # with a cache, transformers does not look for packed sequences
        )

    assert targets == int(packed.loss_mask.sum())
    assert padded_loss == pytest.approx(separate_loss, abs=1e-5)
    assert packed_output.loss.item() == pytest.approx(separate_loss, abs=1e-5)
    torch.testing.assert_close(packed_output.logits[0], torch.cat(separate_logits), atol=1e-5, rtol=1e-5)


def test_a_filler_is_a_few_text_tokens_shaped_like_the_batch() -> None:
    batch = pack_sequences([toy([1, 2, 3], None, images=1, score_index=2), toy([4, 5], None, images=2, score_index=1)])
    filler = batch.filler()  # as many one-token sequences, scored, without images
    assert filler.input_ids.tolist() == [[1, 1]] and filler.cu_seqlens.tolist() == [0, 1, 2]
    assert filler.score_indices.tolist() == [0, 1] and filler.num_images == 0 and not filler.loss_mask.any()
    assert filler.position_ids.tolist() == [[[0, 0]]] * 3
    pairs = batch.filler(sequences=3, length=2)
    assert pairs.input_ids.tolist() == [[1] * 6] and pairs.cu_seqlens.tolist() == [0, 2, 4, 6]
    assert pairs.max_seqlen == 2 and pairs.score_indices.tolist() == [1, 3, 5]
    assert pairs.position_ids[:, 0].tolist() == [[0, 1, 0, 1, 0, 1]] * 3
