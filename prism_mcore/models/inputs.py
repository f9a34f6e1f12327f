"""Forward inputs of the Qwen3-VL models: packed (THD) batches, and conversion from padded ones.

Training and scoring run on packed batches: the token ids of all sequences back to back, `input_ids [1, T]`, with
their boundaries in `cu_seqlens [n+1]` (Megatron's `PackedSeqParams`, `qkv_format="thd"`). Attention is causal within
each sequence and never crosses a boundary; the model computes each sequence's own 3-D MRoPE positions from its
image tokens and `image_grid_thw` (so the discriminator sees real MRoPE positions, PRISM Decisions 2). The images of
all sequences are concatenated in sequence order, as the vision tower consumes them.

    batch = pack_sequences([ids_a, ids_b], [images_a, None])      # or pack_padded(input_ids, attention_mask, ...)
    output = model(**batch.model_kwargs())                         # logits [1, T, V/tp] or scores [1, T, 1]

A padded batch `[b, s]` can also be fed as is (`model(input_ids=ids, pixel_values=..., image_grid_thw=...)`) when it
is right-padded: causal attention keeps pads out of every real token's view. Left- or mixed-padded batches must be
packed with `pack_padded`, which works for any padding side; `unpack_to_padded` puts per-token outputs back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from prism_mcore.record import ImageInputs


@dataclass
class PackedBatch:
    """Sequences packed into one row, with the images they contain."""

    input_ids: torch.Tensor  # [1, T]
    cu_seqlens: torch.Tensor  # [n+1] int32 offsets of the sequences in input_ids
    pixel_values: torch.Tensor | None = None  # patches of all images, in sequence order
    image_grid_thw: torch.Tensor | None = None  # [num_images, 3]

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, device: torch.device | str) -> PackedBatch:
        return replace(self, **{k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)})

    def packed_seq_params(self) -> PackedSeqParams:
        max_len = int(self.lengths.max())
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
        )

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a Qwen3-VL (Megatron) forward on this batch."""
        return {
            "input_ids": self.input_ids,
            "position_ids": None,  # the model derives per-sequence 3-D MRoPE positions
            "attention_mask": None,
            "packed_seq_params": self.packed_seq_params(),
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }

    def next_token_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets `[1, T]` (the id at t+1 of the same sequence) and a mask `[1, T]` of positions that have one.

        The last token of each sequence has no target (the next id belongs to another sequence): its target is 0 and
        its mask False.
        """
        ids = self.input_ids[0]
        targets = torch.zeros_like(ids)
        targets[:-1] = ids[1:]
        valid = torch.ones_like(ids, dtype=torch.bool)
        valid[self.cu_seqlens[1:].long() - 1] = False
        return targets.masked_fill(~valid, 0)[None], valid[None]


def pack_sequences(sequences: Sequence[torch.Tensor], images: Sequence[ImageInputs | None] = ()) -> PackedBatch:
    """Pack 1-D token id tensors (and, per sequence, its images or None) into one `PackedBatch`."""
    if not sequences:
        raise ValueError("nothing to pack")
    if images and len(images) != len(sequences):
        raise ValueError(f"{len(images)} image entries for {len(sequences)} sequences")
    lengths = torch.tensor([len(s) for s in sequences])
    if bool((lengths == 0).any()):
        raise ValueError("cannot pack an empty sequence")
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    present = [item for item in images if item is not None]
    return PackedBatch(
        input_ids=torch.cat(list(sequences))[None],
        cu_seqlens=cu_seqlens,
        pixel_values=torch.cat([item.pixel_values for item in present]) if present else None,
        image_grid_thw=torch.cat([item.image_grid_thw for item in present]) if present else None,
    )


def pack_padded(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
) -> PackedBatch:
    """Drop the padding of a `[b, s]` batch (any padding side) and pack its rows; images stay in row order."""
    mask = attention_mask.bool()
    rows = [input_ids[i][mask[i]] for i in range(input_ids.shape[0])]
    batch = pack_sequences(rows)
    return replace(batch, pixel_values=pixel_values, image_grid_thw=image_grid_thw)


def unpack_to_padded(values: torch.Tensor, attention_mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Scatter per-token outputs `[1, T, ...]` of a batch packed by `pack_padded` back to `[b, s, ...]`."""
    mask = attention_mask.bool()
    out = values.new_full((*mask.shape, *values.shape[2:]), fill)
    out[mask] = values[0]
    return out
