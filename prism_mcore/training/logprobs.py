"""Log-probabilities and entropy of given tokens under the Megatron policy: the one computation every stage shares.

The PPO-family losses need log pi(y_t) of the response tokens (PRISM_SPEC §4, §5.2), old-policy recomputation needs
the same without gradients, and the actor logs the entropy (§8.9). All go through `token_logprobs`, which takes
either the logits or the final hidden states plus the output-layer weight, and works on the vocabulary shard that
Megatron's output layer gives this tensor-parallel rank (vocab-parallel: no rank ever holds full-vocabulary logits).
The math (temperature, chunking, the shard reductions and their gradients) is the plain-torch reference in
`algorithms/logprobs.py`; the hidden-states path runs the fused linear log-prob kernel (`prism_kernels`) on GPU.

Inside a forward, `logprobs_output_processor` replaces the vocabulary projection of the last pipeline stage, so the
model returns `(logprobs, entropy)` instead of logits:

    targets, valid = batch.next_token_targets()                # data/batching.py: id at t+1 of each sequence
    logprobs, entropy = model(
        **forward_kwargs(batch),                               # models/inputs.py
        output_processor=logprobs_output_processor,
        output_processor_context=LogProbRequest(targets, temperature=1.0),
    )                                                          # both [1, T], fp32; mask with `valid`

Position t scores `targets[:, t]`, i.e. the distribution the model predicts after reading token t. With
`LogProbRequest.positions`, only those positions of a packed batch are projected onto the vocabulary (the training
losses need no others) and the rest of the returned `[1, T]` tensors is zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig
from prism_kernels.linear_logprobs import fused_linear_logprobs_and_entropy

from prism_mcore.algorithms.logprobs import logprobs_and_entropy


@dataclass(frozen=True)
class LogProbRequest:
    """What `logprobs_output_processor` computes: the log-prob of `targets` [b, s] at every position."""

    targets: torch.Tensor
    temperature: float = 1.0
    # [P] int64 token indices of a packed ([1, T]) batch: compute only there (zeros elsewhere); None: everywhere
    positions: torch.Tensor | None = None


def token_logprobs(
    targets: torch.Tensor,
    *,
    logits: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    output_weight: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (log-prob of each target, entropy of the next-token distribution), both shaped like `targets`.

    Give either `logits [..., V_shard]` (this TP rank's vocabulary shard, as the output layer returns it with
    `parallel_output=True`) or `hidden [..., H]` (replicated over the TP group) with `output_weight [V_shard, H]`.
    `targets` hold full-vocabulary ids. Differentiable with respect to the logits, or the hidden states and weight.
    """
    if (logits is None) == (hidden is None) or (hidden is None) != (output_weight is None):
        raise ValueError("pass either logits, or hidden together with output_weight")
    group = parallel_state.get_tensor_model_parallel_group()
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        group = None
    shard_size = logits.shape[-1] if logits is not None else output_weight.shape[0]
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * shard_size
    flat_targets = targets.reshape(-1)
    if logits is not None:
        logprobs, entropy = logprobs_and_entropy(
            logits.reshape(-1, shard_size), flat_targets, temperature=temperature, vocab_start=vocab_start, group=group
        )
    else:
        # The fused Triton kernel on CUDA tensors (no [tokens x vocab] logits), the torch reference elsewhere.
        logprobs, entropy = fused_linear_logprobs_and_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            output_weight,
            flat_targets,
            temperature=temperature,
            vocab_start=vocab_start,
            group=group,
        )
    return logprobs.view(targets.shape), entropy.view(targets.shape)


def logprobs_output_processor(
    *,
    hidden_states: torch.Tensor,
    output_layer: torch.nn.Module,
    output_weight: torch.Tensor | None,
    context: LogProbRequest,
    config: TransformerConfig,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron `output_processor` of the GPT model: `(logprobs, entropy)` `[b, s]` from the final hidden states.

    `output_weight` is the embedding when input and output embeddings are tied, else None (the output layer's own
    weight shard is used).
    """
    if config.sequence_parallel:
        # Gather the sequence shards; the vocab-parallel math sums the hidden-state gradient over TP ranks itself,
        # so the gather's backward must only split (not reduce-scatter).
        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
    weight = output_weight if output_weight is not None else output_layer.weight
    targets = context.targets.transpose(0, 1)  # hidden states are [s, b, H]
    if context.positions is None:
        logprobs, entropy = token_logprobs(
            targets, hidden=hidden_states, output_weight=weight, temperature=context.temperature
        )
        return logprobs.transpose(0, 1), entropy.transpose(0, 1)
    # Only the positions that carry a loss go through the vocabulary projection (a packed batch: b = 1).
    selected_logprobs, selected_entropy = token_logprobs(
        targets[context.positions, 0],
        hidden=hidden_states[context.positions, 0],
        output_weight=weight,
        temperature=context.temperature,
    )
    rows = (torch.zeros_like(context.positions), context.positions)  # [1, T] outputs, zero off the positions
    logprobs = selected_logprobs.new_zeros(context.targets.shape).index_put(rows, selected_logprobs)
    entropy = selected_entropy.new_zeros(context.targets.shape).index_put(rows, selected_entropy)
    return logprobs, entropy
