"""Chunked log-prob/entropy reference: hand values, temperature, chunking and gradients against the naive formula."""

from __future__ import annotations

import math

import torch

from prism_mcore.algorithms import linear_logprobs_and_entropy, logprobs_and_entropy


def _naive(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_p.gather(-1, targets[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def test_hand_computed_distribution_with_temperature():
    # logits / 2 = log([1, 2, 5]): softmax [1/8, 2/8, 5/8].
    logits = 2 * torch.log(torch.tensor([[1.0, 2.0, 5.0]]))
    logp, entropy = logprobs_and_entropy(logits, torch.tensor([2]), temperature=2.0)
    probs = [1 / 8, 2 / 8, 5 / 8]
    torch.testing.assert_close(logp, torch.tensor([math.log(5 / 8)]))
    torch.testing.assert_close(entropy, torch.tensor([-sum(p * math.log(p) for p in probs)]))


def test_chunked_matches_naive_values_and_gradients():
    torch.manual_seed(0)
    logits = (3 * torch.randn(7, 11)).requires_grad_()
    targets = torch.randint(0, 11, (7,))
    upstream = torch.randn(2, 7)

    logp, entropy = logprobs_and_entropy(logits, targets, temperature=0.7, chunk_size=3)
    ((logp * upstream[0]).sum() + (entropy * upstream[1]).sum()).backward()
    grad = logits.grad.clone()
    logits.grad = None
    naive_logp, naive_entropy = _naive(logits, targets, temperature=0.7)
    ((naive_logp * upstream[0]).sum() + (naive_entropy * upstream[1]).sum()).backward()

    torch.testing.assert_close(logp, naive_logp)
    torch.testing.assert_close(entropy, naive_entropy)
    torch.testing.assert_close(grad, logits.grad)


def test_linear_variant_equals_logits_variant():
    torch.manual_seed(1)
    hidden, weight, targets = torch.randn(5, 6), torch.randn(9, 6), torch.randint(0, 9, (5,))
    expected = logprobs_and_entropy(hidden @ weight.T, targets)
    for got, want in zip(linear_logprobs_and_entropy(hidden, weight, targets), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_bf16_logits_are_upcast():
    torch.manual_seed(2)
    logits = torch.randn(4, 10).bfloat16()
    targets = torch.randint(0, 10, (4,))
    logp, entropy = logprobs_and_entropy(logits, targets)
    assert logp.dtype == entropy.dtype == torch.float32
    naive_logp, naive_entropy = _naive(logits, targets)
    torch.testing.assert_close(logp, naive_logp)
    torch.testing.assert_close(entropy, naive_entropy)
