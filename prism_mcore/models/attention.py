"""Core attention on `torch.nn.functional.scaled_dot_product_attention`, for CPUs and GPUs without Transformer Engine.

Megatron-Core's own non-TE core attention (`DotProductAttention`) cannot take packed sequences, and Megatron-Bridge's
Qwen3-VL attention silently replaces it with a causal-only fallback that ignores masks. This module is the core
attention of the local layer specs instead (`models/specs.py`); it covers what the Qwen3-VL language model and vision
tower need:

* padded batches (`sbhd`: query `[s, b, heads, d]`), causal or bidirectional, with an optional Megatron boolean mask
  (`True` = masked out) that is combined with the causal mask;
* packed variable-length sequences (`thd`: query `[t, heads, d]` plus `PackedSeqParams.cu_seqlens_q/kv`), each
  segment attending only to itself: causal per sample in the language model, bidirectional within each image (frame)
  and block-diagonal across images in the vision tower. Segments are computed one at a time, so memory and compute
  grow with sum(len²), not total_len²;
* grouped-query attention (fewer key/value heads than query heads) without materialising repeated keys.

The output layout follows Megatron's core-attention contract: `[s, b, heads * d]` for `sbhd`, `[t, heads * d]` for
`thd`. Numerics equal the eager softmax(QKᵀ·scale)V of transformers to fp32 rounding (tests/unit/models).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)


class SDPAttention(MegatronModule):
    """Drop-in `core_attention` submodule for Megatron layer specs (same constructor and forward signature)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention (model.attention_backend='te')")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        # apply_query_key_layer_scaling only rescales scores inside Megatron's fused softmax and undoes it there,
        # so the effective scale is always 1/sqrt(head_dim) unless the config sets one.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention bias")
        causal = (attn_mask_type or self.attn_mask_type) in _CAUSAL_TYPES
        dropout = self.dropout if self.training else 0.0
        # Dropout masks must differ across tensor-parallel ranks (each holds other heads): Megatron's tracker.
        with get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            if packed_seq_params is not None:
                return self._packed(query, key, value, packed_seq_params, causal, dropout)
            return self._padded(query, key, value, attention_mask, causal, dropout)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, dropout: float
    ) -> torch.Tensor:
        """q [b, hq, sq, d], k/v [b, hkv, sk, d] -> [b, hq, sq, d]."""
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=causal and mask is None,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )

    def _padded(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        causal: bool,
        dropout: float,
    ) -> torch.Tensor:
        seq_q, batch = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [s, b, h, d] -> [b, h, s, d]
        allowed = None
        if attention_mask is not None:
            allowed = ~attention_mask.bool()  # Megatron masks are True where attention is forbidden
            if causal:
                allowed = allowed & torch.ones(seq_q, k.shape[2], dtype=torch.bool, device=q.device).tril()
            # A fully masked row (a left-padding position) would give NaN, which then leaks through 0 * NaN in
            # later layers; letting every position see itself keeps pad outputs finite and never touches real ones.
            allowed = allowed | torch.eye(seq_q, k.shape[2], dtype=torch.bool, device=q.device)
        out = self._attend(q, k, v, allowed, causal, dropout)
        return out.permute(2, 0, 1, 3).reshape(seq_q, batch, -1)

    def _packed(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        params: PackedSeqParams,
        causal: bool,
        dropout: float,
    ) -> torch.Tensor:
        if query.dim() == 4:  # [t, 1, h, d]: packed tokens with a dummy batch dimension
            query, key, value = (x.squeeze(1) for x in (query, key, value))
        cu_q = _offsets(params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q)
        cu_kv = _offsets(
            params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        )
        out = query.new_zeros(query.shape[0], query.shape[1], value.shape[2])
        for q_start, q_end, kv_start, kv_end in zip(cu_q[:-1], cu_q[1:], cu_kv[:-1], cu_kv[1:], strict=True):
            if q_end == q_start:
                continue
            q, k, v = (
                x[start:end].transpose(0, 1).unsqueeze(0)  # [len, h, d] -> [1, h, len, d]
                for x, start, end in ((query, q_start, q_end), (key, kv_start, kv_end), (value, kv_start, kv_end))
            )
            out[q_start:q_end] = self._attend(q, k, v, None, causal, dropout)[0].transpose(0, 1)
        return out.reshape(out.shape[0], -1)


def _offsets(cu_seqlens: torch.Tensor) -> list[int]:
    return [int(x) for x in cu_seqlens.tolist()]
