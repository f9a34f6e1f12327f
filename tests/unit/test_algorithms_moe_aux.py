"""Router load-balancing loss against hand-computed values (PRISM_SPEC §2.5)."""

from __future__ import annotations

import math

import torch

from prism_mcore.algorithms import load_balancing_loss

LN3 = math.log(3.0)
# Two layers, one sequence of two tokens, two experts, top-1. Softmax rows are [3/4, 1/4] or [1/4, 3/4].
LAYER_1 = torch.tensor([[LN3, 0.0], [0.0, LN3]])  # token a -> expert 0, token b -> expert 1
LAYER_2 = torch.tensor([[LN3, 0.0], [LN3, 0.0]])  # both tokens -> expert 0


def test_uniform_routing_gives_top_k():
    logits = [torch.zeros(5, 4), torch.zeros(5, 4)]
    torch.testing.assert_close(load_balancing_loss(logits, top_k=2), torch.tensor(2.0))


def test_loss_pools_layers_and_tokens():
    # f = [3/4, 1/4] (3 of the 4 (layer, token) pairs pick expert 0), P = [0.625, 0.375].
    expected = 2 * (0.75 * 0.625 + 0.25 * 0.375)
    torch.testing.assert_close(load_balancing_loss([LAYER_1, LAYER_2], top_k=1), torch.tensor(expected))


def test_attention_mask_drops_padding_tokens_in_every_layer():
    # Token b is padding: only token a remains in both layers, f = [1, 0], P = [3/4, 1/4].
    mask = torch.tensor([[1, 0]])
    torch.testing.assert_close(load_balancing_loss([LAYER_1, LAYER_2], top_k=1, attention_mask=mask), torch.tensor(1.5))
