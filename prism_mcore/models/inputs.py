"""Forward inputs of the Qwen3-VL models: a packed (THD) batch as Megatron's forward takes it.

Training and scoring run on packed batches (`data.batching.PackedBatch`): the token ids of all sequences back to
back, `input_ids [1, T]`, with their boundaries in `cu_seqlens [n+1]` (Megatron's `PackedSeqParams`,
`qkv_format="thd"`). Attention is causal within each sequence and never crosses a boundary; the model computes each
sequence's own 3-D MRoPE positions from its image tokens and `image_grid_thw` (so the discriminator sees real MRoPE
positions, PRISM Decisions 2), or takes the positions the batch carries. The images of all sequences are
concatenated in sequence order, as the vision tower consumes them; a batch packed with `share_images=True` holds each
distinct image once, and `image_index` says which one each sequence's image tokens show.

    batch = pack_token_ids([ids_a, ids_b], [images_a, None])      # data.batching: or pack_sequences, pack_padded
    output = model(**forward_kwargs(batch))                        # logits [1, T, V/tp] or scores [1, T, 1]

A padded batch `[b, s]` can also be fed as is (`model(input_ids=ids, pixel_values=..., image_grid_thw=...)`) when it
is right-padded: causal attention keeps pads out of every real token's view. Left- or mixed-padded batches must be
packed with `data.batching.pack_padded`, which works for any padding side; `unpack_to_padded` puts per-token outputs
back.

Sequence parallelism splits a micro-batch's tokens over the TP ranks, so their count must divide evenly, and TE's FP8
GEMMs want a multiple of 16: `token_multiple(config)` says what the model needs and
`PackedBatch.padded_to_multiple(token_multiple(config), padding_token_id(config))` pads the last sequence to it
(`training.forward` does this for every Megatron forward step).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig

from prism_mcore.data.batching import PackedBatch


def packed_seq_params(batch: PackedBatch) -> PackedSeqParams:
    """The THD attention parameters of `batch`: its sequence boundaries, for queries and keys alike."""
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=batch.cu_seqlens,
        cu_seqlens_kv=batch.cu_seqlens,
        max_seqlen_q=batch.max_seqlen,
        max_seqlen_kv=batch.max_seqlen,
    )


def forward_kwargs(batch: PackedBatch) -> dict[str, Any]:
    """Keyword arguments of a Qwen3-VL (Megatron) forward on `batch`."""
    return {
        "input_ids": batch.input_ids,
        # Built sequences carry their 3-D MRoPE positions (`data.samples`, the same as transformers'
        # `get_rope_index`): passed in, the model skips its own derivation and that derivation's host syncs.
        # Without them (`pack_token_ids`), the model derives them from the ids and image grids.
        "position_ids": batch.position_ids,
        "attention_mask": None,
        "packed_seq_params": packed_seq_params(batch),
        "pixel_values": batch.pixel_values,
        "image_grid_thw": batch.image_grid_thw,
        "image_index": batch.image_index,
        "image_keys": batch.image_keys,
    }


def token_multiple(config: TransformerConfig) -> int:
    """The number of tokens a packed micro-batch must be a multiple of: the TP size under sequence parallelism (the
    bridge's Qwen3-VL-MoE turns it on whenever TP > 1), 16 with FP8, else 1."""
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    if config.fp8:
        multiple = math.lcm(multiple, 16)
    return multiple


def padding_token_id(config: TransformerConfig) -> int:
    """A text token to pad with: the smallest id that is none of the model's vision tokens."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    vision = {getattr(config, name, None) for name in names}
    return next(token for token in itertools.count() if token not in vision)
