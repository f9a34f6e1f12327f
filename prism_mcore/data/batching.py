"""Batching: token-budget micro-batches, sequence packing (THD) and right-padded batches.

Dynamic batch size (PRISM_SPEC §4, §5.1: "dynamic batch size on; N tokens per GPU"): `token_budget_batches` groups
sequences so that each micro-batch stays within a token budget, longest first. A packed micro-batch costs the sum of
its lengths; a padded one costs its longest length times its size.

Two batch forms, with the same content:

- `PackedBatch` is what a packed (THD / varlen) forward takes: all sequences concatenated into one row
  (`input_ids [1, T]`), their MRoPE positions concatenated per sequence (`position_ids [3, 1, T]`, each sequence
  starting again from its own positions), `cu_seqlens` (int32 sequence starts) and `max_seqlen` for the attention
  kernel, labels, and the image inputs of all sequences concatenated in order. Attention must stay within each
  sequence (PRISM_SPEC §8.5).
- `PaddedBatch` is right-padded `[B, L]` with an attention mask, for HF/reference paths.

Labels follow the transformers convention: unshifted, the target token id where a loss applies and -100 elsewhere.
The first token of every built sequence is a prompt token, so shifting a packed row never trains one sequence's last
token on the next sequence's first; `PackedBatch.next_token_labels` gives the shifted form without relying on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from prism_mcore.data.samples import IGNORE_INDEX, TokenSequence


@dataclass
class PackedBatch:
    """Sequences packed into one row for a varlen forward."""

    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [3, 1, T] int64, MRoPE (temporal, height, width), restarting per sequence
    cu_seqlens: torch.Tensor  # [N + 1] int32: sequence i is tokens cu_seqlens[i]:cu_seqlens[i + 1]
    max_seqlen: int
    labels: torch.Tensor  # [1, T] int64, IGNORE_INDEX where no loss applies
    pixel_values: torch.Tensor | None  # [sum of patches, C*T*P*P], images in sequence order
    image_grid_thw: torch.Tensor | None  # [num images, 3]
    score_indices: torch.Tensor | None = None  # [N] int64: each sequence's scored token, as an index into T

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    def sequence_position_ids(self) -> torch.Tensor:
        """`[1, T]`: 0..L_i-1 within each sequence."""
        starts = self.cu_seqlens[:-1].long()
        lengths = self.cu_seqlens.diff().long()
        return (torch.arange(self.num_tokens) - starts.repeat_interleave(lengths)).unsqueeze(0)

    def hf_position_ids(self) -> torch.Tensor:
        """`[4, 1, T]`: per-sequence text positions above the MRoPE rows, the layout with which transformers'
        Qwen3-VL finds the packed sequence boundaries (a position reset) and keeps attention within them; it does so
        only without an attention mask and without a KV cache (`use_cache=False`)."""
        return torch.cat([self.sequence_position_ids().unsqueeze(0), self.position_ids])

    def next_token_labels(self) -> torch.Tensor:
        """`[1, T]` shifted labels: position t holds the label of token t+1 of the same sequence, IGNORE_INDEX at
        each sequence's last token (Megatron's convention, where logits[t] is scored against labels[t])."""
        shifted = torch.full_like(self.labels, IGNORE_INDEX)
        shifted[:, :-1] = self.labels[:, 1:]
        shifted[:, self.cu_seqlens[1:].long() - 1] = IGNORE_INDEX
        return shifted


@dataclass
class PaddedBatch:
    """Sequences right-padded to the longest one."""

    input_ids: torch.Tensor  # [B, L] int64, pad_token_id after each sequence
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens
    position_ids: torch.Tensor  # [3, B, L] int64, 0 on padding
    labels: torch.Tensor  # [B, L] int64, IGNORE_INDEX on padding and where no loss applies
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    score_indices: torch.Tensor | None = None  # [B] int64: each row's scored token


def _labels(sequence: TokenSequence) -> torch.Tensor:
    return sequence.labels if sequence.labels is not None else torch.full_like(sequence.input_ids, IGNORE_INDEX)


def _image_inputs(sequences: Sequence[TokenSequence]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    inputs = [sequence.image_inputs for sequence in sequences if sequence.image_inputs is not None]
    if not inputs:
        return None, None
    return torch.cat([i.pixel_values for i in inputs]), torch.cat([i.image_grid_thw for i in inputs])


def _score_indices(sequences: Sequence[TokenSequence], offsets: Sequence[int]) -> torch.Tensor | None:
    scored = [sequence.score_index is not None for sequence in sequences]
    if not any(scored):
        return None
    if not all(scored):
        raise ValueError("either every sequence of a batch has a score index or none has")
    return torch.tensor([offset + sequence.score_index for sequence, offset in zip(sequences, offsets, strict=True)])


def pack_sequences(sequences: Sequence[TokenSequence]) -> PackedBatch:
    """Concatenate `sequences` into one `PackedBatch`."""
    if not sequences:
        raise ValueError("cannot pack an empty list of sequences")
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    cu_seqlens = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    pixel_values, image_grid_thw = _image_inputs(sequences)
    return PackedBatch(
        input_ids=torch.cat([sequence.input_ids for sequence in sequences]).unsqueeze(0),
        position_ids=torch.cat([sequence.position_ids for sequence in sequences], dim=1).unsqueeze(1),
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()),
        labels=torch.cat([_labels(sequence) for sequence in sequences]).unsqueeze(0),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        score_indices=_score_indices(sequences, cu_seqlens[:-1].tolist()),
    )


def pad_sequences(sequences: Sequence[TokenSequence], pad_token_id: int) -> PaddedBatch:
    """Right-pad `sequences` into one `PaddedBatch`."""
    if not sequences:
        raise ValueError("cannot pad an empty list of sequences")
    batch, length = len(sequences), max(len(sequence) for sequence in sequences)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    position_ids = torch.zeros(3, batch, length, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        size = len(sequence)
        input_ids[row, :size] = sequence.input_ids
        attention_mask[row, :size] = 1
        position_ids[:, row, :size] = sequence.position_ids
        labels[row, :size] = _labels(sequence)
    pixel_values, image_grid_thw = _image_inputs(sequences)
    return PaddedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        labels=labels,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        score_indices=_score_indices(sequences, [0] * batch),
    )


def token_budget_batches(lengths: Sequence[int], max_tokens: int, padded: bool = False) -> list[list[int]]:
    """Group indices of `lengths` into micro-batches of at most `max_tokens` tokens each, longest first.

    Packed (`padded=False`), a micro-batch costs the sum of its lengths, and sequences go first-fit-decreasing into
    the first micro-batch with room, which keeps their number close to the minimum. Padded, it costs its longest
    length times its size, so the length-sorted sequences are cut into consecutive runs.
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    if order and lengths[order[0]] > max_tokens:
        raise ValueError(f"a sequence of {lengths[order[0]]} tokens does not fit max_tokens={max_tokens}")
    batches: list[list[int]] = []
    if padded:
        for index in order:
            # In descending order, the first member of the open batch is its longest.
            if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
                batches[-1].append(index)
            else:
                batches.append([index])
        return batches
    loads: list[int] = []
    for index in order:
        fitting = next((b for b, load in enumerate(loads) if load + lengths[index] <= max_tokens), None)
        if fitting is None:
            batches.append([index])
            loads.append(lengths[index])
        else:
            batches[fitting].append(index)
            loads[fitting] += lengths[index]
    return batches


def stream_token_budget_batches(
    sequences: Iterable[TokenSequence], max_tokens: int, window: int, padded: bool = False
) -> Iterator[list[TokenSequence]]:
    """Token-budget micro-batches over a stream: each `window` consecutive sequences are grouped together.

    A window of a few hundred sequences gives micro-batches of similar lengths while keeping the data order
    (shuffled upstream) random at the scale of an epoch.
    """
    buffer: list[TokenSequence] = []
    for sequence in sequences:
        buffer.append(sequence)
        if len(buffer) == window:
            yield from _group(buffer, max_tokens, padded)
            buffer = []
    if buffer:
        yield from _group(buffer, max_tokens, padded)


def _group(buffer: list[TokenSequence], max_tokens: int, padded: bool) -> Iterator[list[TokenSequence]]:
    lengths = [len(sequence) for sequence in buffer]
    for indices in token_budget_batches(lengths, max_tokens, padded):
        yield [buffer[index] for index in indices]
