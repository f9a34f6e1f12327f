"""Fused discriminator loss (forward, metrics, backward) against `prism_mcore.algorithms.discriminator_loss`."""

from __future__ import annotations

import pytest
import torch
from prism_kernels.discriminator_loss import fused_discriminator_loss

from prism_mcore.algorithms import DISCRIMINATOR_METRICS, discriminator_loss

SCORE_NAMES = ("student_caption", "student_cot", "teacher_caption", "teacher_cot")


def _scores(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Raw scores with a NaN, an Inf and values beyond the +-10 clip."""
    gen = torch.Generator().manual_seed(seed)
    scores = {name: 6 * torch.randn(batch, generator=gen) for name in SCORE_NAMES}
    scores["student_cot"][1] = float("nan")
    scores["teacher_caption"][2] = float("inf")
    scores["student_caption"][0] = 11.0
    scores["teacher_cot"][3] = -13.0
    return scores


def _run(fn, scores, valid, device, dtype=torch.float32, upstream=2.5, **kwargs):
    leaves = {name: s.detach().to(device=device, dtype=dtype).requires_grad_() for name, s in scores.items()}
    out = fn(**leaves, valid=valid.to(device), **kwargs)
    (upstream * out.loss).backward()
    return out, {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize(
    ("valid", "num_valid_global"),
    [
        ([1, 1, 0, 1, 0, 1, 1], None),  # the usual case, counted locally
        ([0, 0, 0, 0, 0, 0, 0], 0),  # no rank has a valid sample: the fallback
        ([0, 0, 0, 0, 0, 0, 0], 12),  # other ranks do: only the regulariser here
    ],
)
def test_matches_reference(valid, num_valid_global, device):
    scores, valid = _scores(7), torch.tensor(valid, dtype=torch.bool)
    expected, expected_grads = _run(discriminator_loss, scores, valid, device, num_valid_global=num_valid_global)
    got, got_grads = _run(
        fused_discriminator_loss, scores, valid, device, num_valid_global=num_valid_global, backend="triton"
    )
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-7)
    assert list(got.metrics) == list(DISCRIMINATOR_METRICS)
    for name in DISCRIMINATOR_METRICS:
        torch.testing.assert_close(got.metrics[name], expected.metrics[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in SCORE_NAMES:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-5, atol=1e-8, msg=name)


def test_bf16_scores_get_bf16_gradients(device):
    scores, valid = _scores(5, seed=1), torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)
    expected, expected_grads = _run(discriminator_loss, scores, valid, device, dtype=torch.bfloat16)
    got, got_grads = _run(fused_discriminator_loss, scores, valid, device, dtype=torch.bfloat16, backend="triton")
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-7)
    for name in SCORE_NAMES:
        assert got_grads[name].dtype == torch.bfloat16
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-2, atol=1e-5)


@pytest.mark.gpu
def test_matches_reference_on_gpu_micro_batch():
    cuda = torch.device("cuda")
    scores, valid = _scores(64, seed=2), torch.rand(64, generator=torch.Generator().manual_seed(3)) > 0.2
    expected, expected_grads = _run(discriminator_loss, scores, valid, cuda, num_valid_global=100)
    got, got_grads = _run(
        fused_discriminator_loss, scores, valid, cuda, num_valid_global=torch.tensor(100, device=cuda)
    )
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-7)
    for name in SCORE_NAMES:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-5, atol=1e-8)
