"""SDPA core attention against the eager formula softmax(QK^T / sqrt(d)) V: padded and packed layouts, causal and
bidirectional masks, grouped-query attention."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from prism_mcore.models.attention import SDPAttention

HEADS, GROUPS, DIM = 4, 2, 16


def _attention(mask_type: AttnMaskType) -> SDPAttention:
    config = TransformerConfig(
        num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=DIM
    )
    return SDPAttention(config, layer_number=1, attn_mask_type=mask_type, attention_type="self").eval()


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [s, hq, d], k/v [s, hkv, d] -> [s, hq * d], one sequence."""
    k, v = (x.repeat_interleave(HEADS // GROUPS, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(DIM)
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


def _qkv(tokens: int, batch: int | None = None) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(tokens)
    lead = (tokens,) if batch is None else (tokens, batch)
    return tuple(torch.randn(*lead, h, DIM, generator=generator) for h in (HEADS, GROUPS, GROUPS))


def _packed(lengths: list[int]) -> PackedSeqParams:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths))


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask])
def test_padded_batch_matches_eager_per_row(mask_type: AttnMaskType) -> None:
    q, k, v = _qkv(7, batch=3)
    out = _attention(mask_type)(q, k, v, attention_mask=None)
    assert out.shape == (7, 3, HEADS * DIM)
    for row in range(3):
        expected = _eager(q[:, row], k[:, row], v[:, row], causal=mask_type == AttnMaskType.causal)
        torch.testing.assert_close(out[:, row], expected)


def test_megatron_padding_mask_combines_with_causal() -> None:
    q, k, v = _qkv(6, batch=2)
    pad = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    pad[0, :, :, :2] = True  # row 0 is left-padded by two tokens (True = masked, Megatron's convention)
    out = _attention(AttnMaskType.causal)(q, k, v, attention_mask=pad)
    torch.testing.assert_close(out[2:, 0], _eager(q[2:, 0], k[2:, 0], v[2:, 0], causal=True))
    torch.testing.assert_close(out[:, 1], _eager(q[:, 1], k[:, 1], v[:, 1], causal=True))
    assert torch.isfinite(out).all()  # pad queries see nothing else but stay finite


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask])
def test_packed_sequences_attend_only_within_themselves(mask_type: AttnMaskType) -> None:
    lengths = [3, 5, 1, 4]
    q, k, v = _qkv(sum(lengths))
    out = _attention(mask_type)(q, k, v, attention_mask=None, packed_seq_params=_packed(lengths))
    assert out.shape == (sum(lengths), HEADS * DIM)
    start = 0
    for length in lengths:
        rows = slice(start, start + length)
        expected = _eager(q[rows], k[rows], v[rows], causal=mask_type == AttnMaskType.causal)
        torch.testing.assert_close(out[rows], expected)
        start += length


def test_packed_images_are_block_diagonal_not_global() -> None:
    # The vision tower packs images as [t, 1, h, d]; attention must not mix two images.
    q, k, v = (x[:, None] for x in _qkv(8))
    blocks = _attention(AttnMaskType.no_mask)(q, k, v, attention_mask=None, packed_seq_params=_packed([4, 4]))
    whole = _eager(q[:, 0], k[:, 0], v[:, 0], causal=False)
    assert (blocks - whole).abs().max() > 1e-3


def test_gradients_match_eager() -> None:
    lengths = [4, 3]
    q, k, v = (x.requires_grad_() for x in _qkv(sum(lengths)))
    out = _attention(AttnMaskType.causal)(q, k, v, attention_mask=None, packed_seq_params=_packed(lengths))
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected = torch.cat([_eager(q[:4], k[:4], v[:4], True), _eager(q[4:], k[4:], v[4:], True)])
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
