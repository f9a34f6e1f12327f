"""Router load-balancing loss of the MoE discriminator during warmup (PRISM_SPEC §2.5, §8.8).

The Switch / Qwen3-MoE auxiliary loss, computed over the router logits of *all* layers at once (the per-layer
logits are concatenated, so f and P are means over every (layer, token) pair, not per-layer losses summed):

    P_e     = mean over (layer, token) of softmax(logits)_e
    f_{k,e} = mean over (layer, token) of 1[the k-th choice of top-k(softmax(logits)) is expert e]
    aux     = E * sum_{k,e} f_{k,e} * P_e

With an attention mask, padding tokens are left out of both means. Perfectly uniform routing gives aux = top_k.
This is the reference formula; the models package may use Megatron's own load-balancing loss instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], *, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Aux loss from per-layer router logits, each [B*S, E] (tokens in batch-major order); mask [B, S] or None."""
    logits = torch.cat([layer.float() for layer in router_logits], dim=0)
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    choice_one_hot = torch.nn.functional.one_hot(chosen, num_experts).float()  # [N, top_k, E]

    if attention_mask is None:
        token_weight = torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)
    else:
        token_weight = attention_mask.reshape(-1).float().repeat(len(router_logits))
        if token_weight.numel() != logits.shape[0]:
            raise ValueError(
                f"attention mask has {attention_mask.numel()} tokens per layer but router logits have "
                f"{logits.shape[0] // len(router_logits)}"
            )
    total = token_weight.sum()
    routed_fraction = (choice_one_hot * token_weight[:, None, None]).sum(dim=0) / total  # f: [top_k, E]
    mean_prob = (probs * token_weight[:, None]).sum(dim=0) / total  # P: [E]
    return num_experts * (routed_fraction * mean_prob[None, :]).sum()
