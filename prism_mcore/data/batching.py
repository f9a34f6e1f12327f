"""Batching: token-budget micro-batches, sequence packing (THD), and which items a step takes (`batch_for_step`: per-epoch shuffles, a pure function of the step).

Dynamic batch size (PRISM_SPEC §4, §5.1: "dynamic batch size on; N tokens per GPU"): `token_budget_batches` groups
sequences so that each packed micro-batch stays within a token budget (the sum of its lengths), longest first.

- `PackedBatch` is what a packed (THD / varlen) forward takes: all sequences concatenated into one row
  (`input_ids [1, T]`), their MRoPE positions concatenated per sequence (`position_ids [3, 1, T]`, each sequence
  starting again from its own positions), `cu_seqlens` (int32 sequence starts) and `max_seqlen` for the attention
  kernel, labels, and the image inputs of all sequences concatenated in order. Attention must stay within each
  sequence (PRISM_SPEC §8.5). `pack_sequences` packs built `TokenSequence`s; `pack_token_ids` packs bare token ids
  (with each sequence's images) and `pack_padded` the rows of a `[b, s]` batch of any padding side: these leave the
  positions to the model (`position_ids=None`) and carry no loss; `unpack_to_padded` puts per-token outputs back.
  `models.forward_kwargs(batch)` turns a `PackedBatch` into the Megatron forward's arguments.

Labels follow the transformers convention: unshifted, the target token id where a loss applies and -100 elsewhere.
The first token of every built sequence is a prompt token, so shifting a packed row never trains one sequence's last
token on the next sequence's first; `PackedBatch.next_token_labels` gives the shifted form without relying on it, and
`PackedBatch.next_token_targets` the shifted token ids (what log-probs are computed of).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from prism_mcore.data.samples import IGNORE_INDEX, TokenSequence
from prism_mcore.record import ImageInputs


@dataclass
class PackedBatch:
    """Sequences packed into one row for a varlen forward."""

    input_ids: torch.Tensor  # [1, T] int64
    cu_seqlens: torch.Tensor  # [N + 1] int32: sequence i is tokens cu_seqlens[i]:cu_seqlens[i + 1]
    max_seqlen: int
    labels: torch.Tensor  # [1, T] int64, IGNORE_INDEX where no loss applies
    # [3, 1, T] int64, MRoPE (temporal, height, width), restarting per sequence; None: the model derives them
    position_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None  # [sum of patches, C*T*P*P], images in sequence order
    image_grid_thw: torch.Tensor | None = None  # [num images, 3]
    score_indices: torch.Tensor | None = None  # [N] int64: each sequence's scored token, as an index into T
    # [images in sequence order] int64: the row of `image_grid_thw` (and the pixels) each image token run shows;
    # None: one row per image in sequence order. Set by `pack_sequences(..., share_images=True)`.
    image_index: torch.Tensor | None = None
    # One key per row of `image_grid_thw` (`ImageInputs.content_key` and the image's place in that input): the same
    # image has the same key in every micro-batch of a step. Set by `pack_sequences(..., share_images=True)`.
    image_keys: tuple[str, ...] | None = None

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    @property
    def num_images(self) -> int:
        """Images the vision tower encodes for this batch (each distinct image once when images are shared)."""
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    def filler(self, sequences: int | None = None, length: int = 1) -> PackedBatch:
        """A text batch of `sequences` (default: as many as this batch has) sequences of `length` copies of this
        batch's first token, scored at their last token when this batch is scored: what a data-parallel rank runs,
        at a zero loss, to keep step with the others (`training.step.Filler`). The first token of a built sequence
        is a chat-template token, never an image token."""
        sequences = self.num_sequences if sequences is None else sequences
        input_ids = self.input_ids[:, :1].repeat(1, sequences * length)
        position_ids = None
        if self.position_ids is not None:
            position_ids = torch.arange(length).repeat(sequences).expand(3, 1, sequences * length).clone()
        return PackedBatch(
            input_ids=input_ids,
            cu_seqlens=torch.arange(0, sequences * length + 1, length, dtype=torch.int32),
            max_seqlen=length,
            labels=torch.full_like(input_ids, IGNORE_INDEX),
            position_ids=position_ids,
            score_indices=None if self.score_indices is None else torch.arange(length - 1, sequences * length, length),
        )

    def to(self, device: torch.device | str) -> PackedBatch:
        """This batch with every tensor on `device`."""
        return replace(self, **{k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)})

    def padded_to_multiple(self, multiple: int, pad_token_id: int) -> PackedBatch:
        """This batch with its last sequence extended by `pad_token_id` tokens, without a loss, to a token count
        divisible by `multiple` (sequence parallelism splits the tokens over the TP ranks; FP8 GEMMs want 16).

        Causal attention keeps the padding out of every real token's view, and sequence boundaries, scored tokens
        and the number of sequences stay as they were. Positions, when present, continue the last sequence's text
        positions. Per-token outputs of the padded batch are `[1, T']`; the first T are this batch's.
        """
        pad = -self.num_tokens % multiple
        if pad == 0:
            return self
        cu_seqlens = self.cu_seqlens.clone()
        cu_seqlens[-1] += pad
        position_ids = None
        if self.position_ids is not None:
            after_last = self.position_ids[:, :, -1:].amax(dim=0, keepdim=True) + 1
            steps = torch.arange(pad, device=self.position_ids.device).view(1, 1, pad)
            position_ids = torch.cat([self.position_ids, (after_last + steps).expand(3, 1, pad)], dim=2)
        return replace(
            self,
            input_ids=torch.nn.functional.pad(self.input_ids, (0, pad), value=pad_token_id),
            labels=torch.nn.functional.pad(self.labels, (0, pad), value=IGNORE_INDEX),
            cu_seqlens=cu_seqlens,
            max_seqlen=max(self.max_seqlen, int(cu_seqlens[-1] - cu_seqlens[-2])),
            position_ids=position_ids,
        )

    def sequence_position_ids(self) -> torch.Tensor:
        """`[1, T]`: 0..L_i-1 within each sequence."""
        starts = self.cu_seqlens[:-1].long()
        lengths = self.cu_seqlens.diff().long()
        return (torch.arange(self.num_tokens) - starts.repeat_interleave(lengths)).unsqueeze(0)

    def hf_position_ids(self) -> torch.Tensor:
        """`[4, 1, T]`: per-sequence text positions above the MRoPE rows, the layout with which transformers'
        Qwen3-VL finds the packed sequence boundaries (a position reset) and keeps attention within them; it does so
        only without an attention mask and without a KV cache (`use_cache=False`)."""
        if self.position_ids is None:
            raise ValueError("this batch has no MRoPE positions: pack built sequences with `pack_sequences`")
        return torch.cat([self.sequence_position_ids().unsqueeze(0), self.position_ids])

    def next_token_labels(self) -> torch.Tensor:
        """`[1, T]` shifted labels: position t holds the label of token t+1 of the same sequence, IGNORE_INDEX at
        each sequence's last token (Megatron's convention, where logits[t] is scored against labels[t])."""
        return self._next_in_sequence(self.labels, IGNORE_INDEX)

    def next_token_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets `[1, T]` (the id at t+1 of the same sequence) and a bool mask `[1, T]` of positions that have one.

        The last token of each sequence has no target (the next id belongs to another sequence): its target is 0 and
        its mask False.
        """
        valid = self._next_in_sequence(torch.ones_like(self.input_ids, dtype=torch.bool), False)
        return self._next_in_sequence(self.input_ids, 0), valid

    def _next_in_sequence(self, values: torch.Tensor, fill: int | bool) -> torch.Tensor:
        """`values [1, T]` shifted left by one token within each sequence, `fill` at each sequence's last token."""
        shifted = torch.full_like(values, fill)
        shifted[:, :-1] = values[:, 1:]
        shifted[:, self.cu_seqlens[1:].long() - 1] = fill
        return shifted


def _labels(sequence: TokenSequence) -> torch.Tensor:
    return sequence.labels if sequence.labels is not None else torch.full_like(sequence.input_ids, IGNORE_INDEX)


def _image_inputs(images: Sequence[ImageInputs | None]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    present = [item for item in images if item is not None]
    if not present:
        return None, None
    return torch.cat([i.pixel_values for i in present]), torch.cat([i.image_grid_thw for i in present])


def _same_images(a: ImageInputs, b: ImageInputs) -> bool:
    return a is b or (
        torch.equal(a.image_grid_thw, b.image_grid_thw)
        and a.pixel_values.shape == b.pixel_values.shape
        and torch.equal(a.pixel_values, b.pixel_values)
    )


def _shared_image_inputs(
    images: Sequence[ImageInputs | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, tuple[str, ...] | None]:
    """Pixels and grids of the distinct image inputs of `images` (equal content counts once, in order of first
    appearance), for each image of each sequence, in sequence order, the grid row that holds it, and each grid row's
    key."""
    distinct: list[ImageInputs] = []
    first_rows: list[int] = []  # the first grid row of each distinct entry
    image_index: list[int] = []
    rows = 0
    for item in images:
        if item is None:
            continue
        match = next((d for d, known in enumerate(distinct) if _same_images(known, item)), None)
        if match is None:
            match = len(distinct)
            distinct.append(item)
            first_rows.append(rows)
            rows += item.num_images
        image_index += range(first_rows[match], first_rows[match] + item.num_images)
    if not distinct:
        return None, None, None, None
    pixel_values, image_grid_thw = _image_inputs(distinct)
    keys = tuple(f"{item.content_key}:{i}" for item in distinct for i in range(item.num_images))
    return pixel_values, image_grid_thw, torch.tensor(image_index, dtype=torch.long), keys


def _score_indices(sequences: Sequence[TokenSequence], offsets: Sequence[int]) -> torch.Tensor | None:
    scored = [sequence.score_index is not None for sequence in sequences]
    if not any(scored):
        return None
    if not all(scored):
        raise ValueError("either every sequence of a batch has a score index or none has")
    return torch.tensor([offset + sequence.score_index for sequence, offset in zip(sequences, offsets, strict=True)])


def pack_sequences(sequences: Sequence[TokenSequence], share_images: bool = False) -> PackedBatch:
    """Concatenate built `sequences` into one `PackedBatch`, with their MRoPE positions, labels and score indices.

    With `share_images`, sequences that show the same images (the segments and samples of one prompt) carry them
    once: the batch holds each distinct image input once and `image_index` maps every image of every sequence to
    its row, so the vision tower encodes it once and its embeddings go to each sequence's image tokens (the model
    sums the gradients of the copies, `models.qwen3_vl`). `image_keys` names each distinct image, so that a step's
    other micro-batches reuse its encoding too.
    """
    input_ids = [sequence.input_ids for sequence in sequences]
    images = [sequence.image_inputs for sequence in sequences]
    batch = pack_token_ids(input_ids, images)
    image_index = image_keys = None
    if share_images:
        pixel_values, image_grid_thw, image_index, image_keys = _shared_image_inputs(images)
        batch = replace(batch, pixel_values=pixel_values, image_grid_thw=image_grid_thw)
    return replace(
        batch,
        position_ids=torch.cat([sequence.position_ids for sequence in sequences], dim=1).unsqueeze(1),
        labels=torch.cat([_labels(sequence) for sequence in sequences]).unsqueeze(0),
        score_indices=_score_indices(sequences, batch.cu_seqlens[:-1].tolist()),
        image_index=image_index,
        image_keys=image_keys,
    )


def step_image_count(batches: Sequence[PackedBatch]) -> int:
    """Images the vision tower encodes for one step over `batches` (one model's micro-batches on one rank): each
    distinct image once when the batches carry image keys (the step's image cache, `models.qwen3_vl.StepImages`),
    else every image row of every batch."""
    keys: set[str] = set()
    rows = 0
    for batch in batches:
        if batch.image_keys is None:
            rows += batch.num_images
        else:
            keys.update(batch.image_keys)
    return rows + len(keys)


def pack_token_ids(sequences: Sequence[torch.Tensor], images: Sequence[ImageInputs | None] = ()) -> PackedBatch:
    """Pack 1-D token id tensors (and, per sequence, its images or None) into one `PackedBatch` without a loss; the
    model derives each sequence's MRoPE positions from its image tokens and `image_grid_thw`."""
    if not sequences:
        raise ValueError("cannot pack an empty list of sequences")
    if images and len(images) != len(sequences):
        raise ValueError(f"{len(images)} image entries for {len(sequences)} sequences")
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    if bool((lengths == 0).any()):
        raise ValueError("cannot pack an empty sequence")
    cu_seqlens = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    input_ids = torch.cat(list(sequences)).unsqueeze(0)
    pixel_values, image_grid_thw = _image_inputs(images)
    return PackedBatch(
        input_ids=input_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()),
        labels=torch.full_like(input_ids, IGNORE_INDEX),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
    )


def pack_padded(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
) -> PackedBatch:
    """Drop the padding of a `[b, s]` batch (any padding side) and pack its rows; images stay in row order."""
    mask = attention_mask.bool()
    batch = pack_token_ids([input_ids[row][mask[row]] for row in range(input_ids.shape[0])])
    return replace(batch, pixel_values=pixel_values, image_grid_thw=image_grid_thw)


def unpack_to_padded(values: torch.Tensor, attention_mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Scatter per-token outputs `[1, T, ...]` of a batch packed by `pack_padded` back to `[b, s, ...]`."""
    mask = attention_mask.bool()
    out = values.new_full((*mask.shape, *values.shape[2:]), fill)
    out[mask] = values[0]
    return out


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices of `lengths` into packed micro-batches of at most `max_tokens` tokens each, longest first.

    A micro-batch costs the sum of its lengths, and sequences go first-fit-decreasing into the first micro-batch with
    room, which keeps their number close to the minimum.
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    if order and lengths[order[0]] > max_tokens:
        raise ValueError(f"a sequence of {lengths[order[0]]} tokens does not fit max_tokens={max_tokens}")
    batches: list[list[int]] = []
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


def prompt_order(num_prompts: int, seed: int, epoch: int) -> list[int]:
    """A deterministic shuffle of prompt indices per epoch: the data position is then just the step number."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(num_prompts, generator=generator).tolist()


def batch_for_step(items: list, step: int, per_step: int, seed: int) -> list:
    """The items of step `step` (0-based): consecutive slices of per-epoch shuffles, wrapping around epochs.

    A pure function of the step, so resuming at a step needs no saved data-loader state.
    """
    chosen = []
    position = step * per_step
    while len(chosen) < per_step:
        epoch, offset = divmod(position, len(items))
        order = prompt_order(len(items), seed, epoch)
        take = min(per_step - len(chosen), len(items) - offset)
        chosen += [items[i] for i in order[offset : offset + take]]
        position += take
    return chosen
