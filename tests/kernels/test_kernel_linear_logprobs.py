"""Fused linear log-prob/entropy (forward and backward) against `prism_mcore.algorithms.linear_logprobs_and_entropy`.

fp32 kernels must match the fp32 reference to 1e-5 (relative to the largest magnitude); bf16 kernels are compared
with the fp32 reference on the same (upcast) inputs to 1e-2, the kernel accumulating in fp32 throughout.
"""

from __future__ import annotations

import pytest
import torch
from prism_kernels.linear_logprobs import GPU_TILE_SHAPES, fused_linear_logprobs_and_entropy

from prism_mcore.algorithms import linear_logprobs_and_entropy


def _problem(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden=torch.randn(tokens, hidden, generator=gen).to(device, dtype),
        weight=(torch.randn(vocab, hidden, generator=gen) / hidden**0.25).to(device, dtype),
        targets=torch.randint(0, vocab, (tokens,), generator=gen).to(device),
        upstream=torch.randn(2, tokens, generator=gen).to(device),
    )


def _forward_backward(fn, problem, dtype, **kwargs):
    """(log-probs, entropies, d/dhidden, d/dweight) of sum(u0 * logp + u1 * entropy)."""
    # Fresh leaves per call (`.to` of a tensor already in `dtype` would return the shared one, and its gradient).
    hidden = problem["hidden"].detach().to(dtype).requires_grad_()
    weight = problem["weight"].detach().to(dtype).requires_grad_()
    logp, entropy = fn(hidden, weight, problem["targets"], **kwargs)
    upstream = problem["upstream"]
    ((upstream[0] * logp).sum() + (upstream[1] * entropy).sum()).backward()
    return logp, entropy, hidden.grad, weight.grad


def _assert_close_relative(got: torch.Tensor, want: torch.Tensor, tolerance: float, name: str):
    error = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert error <= tolerance * scale, f"{name}: max error {error:.3g} > {tolerance} x max |reference| {scale:.3g}"


OUTPUTS = ("logp", "entropy", "grad_hidden", "grad_weight")


@pytest.mark.parametrize(
    ("dtype", "tolerance", "temperature", "backward_chunk"),
    [
        (torch.float32, 1e-5, 1.0, None),
        (torch.float32, 1e-5, 0.7, 64),  # several backward chunks, the last one partial
        (torch.bfloat16, 1e-2, 1.3, 96),
    ],
)
def test_matches_reference(dtype, tolerance, temperature, backward_chunk, device):
    # V = 200 spans 7 vocab tiles of 32 in 4 splits: online rescaling within a split and merging across splits.
    problem = _problem(tokens=24, vocab=200, hidden=40, dtype=dtype, device=device)
    expected = _forward_backward(linear_logprobs_and_entropy, problem, torch.float32, temperature=temperature)
    got = _forward_backward(
        fused_linear_logprobs_and_entropy,
        problem,
        dtype,
        temperature=temperature,
        backend="triton",
        backward_chunk=backward_chunk,
    )
    assert got[0].dtype == got[1].dtype == torch.float32
    for name, g, e in zip(OUTPUTS, got, expected, strict=True):
        _assert_close_relative(g, e, tolerance, name)


def test_only_log_probs_used_and_frozen_weight(device):
    problem = _problem(tokens=9, vocab=50, hidden=20, dtype=torch.float32, device=device, seed=1)
    hidden = problem["hidden"].clone().requires_grad_()
    fused_logp, _ = fused_linear_logprobs_and_entropy(hidden, problem["weight"], problem["targets"], backend="triton")
    fused_logp.sum().backward()
    reference_hidden = problem["hidden"].clone().requires_grad_()
    logp, _ = linear_logprobs_and_entropy(reference_hidden, problem["weight"], problem["targets"])
    logp.sum().backward()
    _assert_close_relative(fused_logp, logp, 1e-5, "logp")
    _assert_close_relative(hidden.grad, reference_hidden.grad, 1e-5, "grad_hidden")


def test_vocab_offset_shifts_target_ids(device):
    problem = _problem(tokens=6, vocab=40, hidden=16, dtype=torch.float32, device=device, seed=2)
    base = fused_linear_logprobs_and_entropy(problem["hidden"], problem["weight"], problem["targets"], backend="triton")
    shifted = fused_linear_logprobs_and_entropy(
        problem["hidden"], problem["weight"], problem["targets"] + 1000, vocab_start=1000, backend="triton"
    )
    for a, b in zip(base, shifted, strict=True):
        torch.testing.assert_close(a, b)


def test_rejects_mismatched_shapes_and_dtypes(device):
    problem = _problem(tokens=4, vocab=20, hidden=16, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="expected hidden"):
        fused_linear_logprobs_and_entropy(problem["hidden"], problem["weight"][:, :8], problem["targets"])
    with pytest.raises(ValueError, match="same dtype"):
        fused_linear_logprobs_and_entropy(
            problem["hidden"], problem["weight"].bfloat16(), problem["targets"], backend="triton"
        )


@pytest.mark.gpu
def test_matches_reference_at_qwen3_vl_vocab():
    # Qwen3-VL vocabulary and 4B hidden size; 2,048 tokens keep the fp32 reference's logits within memory.
    problem = _problem(tokens=2048, vocab=151_936, hidden=2560, dtype=torch.bfloat16, device=torch.device("cuda"))
    expected = _forward_backward(linear_logprobs_and_entropy, problem, torch.float32)
    got = _forward_backward(fused_linear_logprobs_and_entropy, problem, torch.bfloat16)
    for name, g, e in zip(OUTPUTS, got, expected, strict=True):
        _assert_close_relative(g, e, 1e-2, name)


@pytest.mark.gpu
def test_fp32_matches_reference_on_gpu():
    problem = _problem(tokens=512, vocab=32_000, hidden=512, dtype=torch.float32, device=torch.device("cuda"))
    expected = _forward_backward(linear_logprobs_and_entropy, problem, torch.float32)
    got = _forward_backward(fused_linear_logprobs_and_entropy, problem, torch.float32, backward_chunk=4096)
    for name, g, e in zip(OUTPUTS, got, expected, strict=True):
        _assert_close_relative(g, e, 1e-5, name)


@pytest.mark.parametrize("on", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_hidden_gradient_sums_chunk_products_in_fp32(on):
    """Each vocabulary chunk's bf16 product goes into the fp32 sum unrounded (on CUDA through cuBLAS's fp32 output)."""
    from prism_kernels.linear_logprobs import _add_product_fp32

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(16, 64, generator=gen).to(on, torch.bfloat16)
    b = torch.randn(64, 24, generator=gen).to(on, torch.bfloat16)
    start = torch.randn(16, 24, generator=gen).to(on)
    total = start.clone()
    _add_product_fp32(total, a, b)
    exact = start.double() + a.double() @ b.double()
    rounded_first = start + (a @ b).float()  # the product rounded to bf16 before the sum
    error = (total.double() - exact).abs().max().item()
    assert total.dtype == torch.float32 and error < 1e-4
    assert (rounded_first.double() - exact).abs().max().item() > 100 * error


@pytest.mark.parametrize("shape", GPU_TILE_SHAPES)
def test_every_tuned_tile_shape_matches_reference(shape, device, monkeypatch):
    """The autotuner may pick any candidate: each must give the reference's values (here in the interpreter)."""
    from prism_kernels import linear_logprobs

    block_t, block_v, block_h, warps = shape
    tiles = linear_logprobs._Tiles(block_t, block_v, block_h, warps, target_programs=4)
    monkeypatch.setattr(linear_logprobs, "_tiles", lambda *args: tiles)
    problem = _problem(tokens=40, vocab=300, hidden=72, dtype=torch.float32, device=device, seed=4)
    expected = _forward_backward(linear_logprobs_and_entropy, problem, torch.float32, temperature=0.9)
    got = _forward_backward(
        fused_linear_logprobs_and_entropy, problem, torch.float32, temperature=0.9, backend="triton", backward_chunk=128
    )
    for name, g, e in zip(OUTPUTS, got, expected, strict=True):
        _assert_close_relative(g, e, 1e-5, name)


def test_tuner_keeps_the_fastest_candidate():
    from prism_kernels.linear_logprobs import _Tiles, fastest_tiles

    candidates = [_Tiles(64, 128, 32, 8, 8), _Tiles(128, 128, 32, 8, 8), _Tiles(32, 128, 64, 4, 8)]
    timed = []

    def milliseconds(tiles):
        timed.append(tiles)
        return {64: 2.0, 128: 1.5, 32: 1.5}[tiles.block_t]

    assert fastest_tiles(candidates, milliseconds) == candidates[1]  # a tie goes to the earlier candidate
    assert timed == candidates  # each timed once
