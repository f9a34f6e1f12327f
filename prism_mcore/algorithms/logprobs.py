"""Log-probabilities of the sampled tokens and entropy of the policy's next-token distribution (PRISM_SPEC §4, §5,
§8.9: the loss needs log pi(y_t), the actor logs the entropy). Plain torch; the reference of
`prism_kernels.linear_logprobs`.

For logits z over the vocabulary and temperature tau, with x = z / tau:

    lse_t     = log sum_v exp(x_t,v)
    logp_t    = x_t,y_t - lse_t
    entropy_t = lse_t - sum_v softmax(x_t)_v x_t,v

Vocab parallelism: under tensor parallelism each rank holds the logits (or output weight rows) of a contiguous vocab
shard starting at `vocab_start`. Each rank reduces its shard to four numbers per token (max, sum of exp, sum of
exp-weighted logits, target logit if the target lies in the shard); the shards are combined with one MAX and one
SUM all-reduce over `group`. The SUM all-reduce has an identity backward, because every rank then computes the same
replicated loss (Megatron's "reduce from tensor-parallel region"); feeding the replicated hidden states into the
sharded output layer all-reduces their gradient instead ("copy to tensor-parallel region").

Tokens are processed in chunks so that the fp32 copy of the logits never exceeds `chunk_size` rows at a time, which
bounds the memory of no-grad passes (old-policy log-probs). Under autograd each chunk's intermediates are kept for
the backward; the Triton kernel avoids even that.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Sum over the group in the forward; the gradient passes through unchanged (the result is replicated)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor, group: dist.ProcessGroup
    ) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _IdentityAllReduceSumBackward(torch.autograd.Function):
    """Identity in the forward; the gradient is summed over the group (each rank saw only its vocab shard)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor, group: dist.ProcessGroup
    ) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def is_vocab_parallel(group: dist.ProcessGroup | None) -> bool:
    """True when `group` spans more than one rank, i.e. the vocabulary is sharded."""
    return group is not None and dist.get_world_size(group) > 1


def combine_vocab_shards(
    shard_max: torch.Tensor,
    shard_sum_exp: torch.Tensor,
    shard_sum_exp_logit: torch.Tensor,
    target_logit: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine per-shard softmax statistics into (lse, mean logit under softmax, target logit) per token.

    `shard_sum_exp` = sum_v exp(x_v - shard_max) and `shard_sum_exp_logit` = sum_v exp(x_v - shard_max) x_v over
    this rank's shard; `target_logit` is x at the target if this shard holds it, else 0. Without a multi-rank
    `group` the inputs already cover the whole vocabulary.
    """
    if not is_vocab_parallel(group):
        return shard_max + torch.log(shard_sum_exp), shard_sum_exp_logit / shard_sum_exp, target_logit
    global_max = shard_max.detach().clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # The max only shifts the exponentials for stability; lse is independent of it, so it carries no gradient.
    rescale = torch.exp(shard_max - global_max)
    stats = torch.stack([shard_sum_exp * rescale, shard_sum_exp_logit * rescale, target_logit])
    sum_exp, sum_exp_logit, target_logit = _AllReduceSumIdentityBackward.apply(stats, group).unbind(0)
    return global_max + torch.log(sum_exp), sum_exp_logit / sum_exp, target_logit


def logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (log-prob of each target, entropy) per token from logits [T, V_shard] and target ids [T] (full-vocab
    ids; this shard holds ids `vocab_start .. vocab_start + V_shard - 1`)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [T, V] and targets [T], got {tuple(logits.shape)}, {tuple(targets.shape)}")
    shard_size = logits.shape[1]
    local_targets = targets - vocab_start
    in_shard = (local_targets >= 0) & (local_targets < shard_size)
    gather_index = local_targets.clamp(0, shard_size - 1)[:, None]

    logps, entropies = [], []
    for start in range(0, logits.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        x = logits[rows].float() / temperature
        shard_max = x.detach().amax(dim=-1)
        exp_shifted = torch.exp(x - shard_max[:, None])
        target_logit = torch.where(in_shard[rows], x.gather(-1, gather_index[rows]).squeeze(-1), 0.0)
        lse, mean_logit, target_logit = combine_vocab_shards(
            shard_max, exp_shifted.sum(-1), (exp_shifted * x).sum(-1), target_logit, group
        )
        logps.append(target_logit - lse)
        entropies.append(lse - mean_logit)
    if not logps:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    return torch.cat(logps), torch.cat(entropies)


def linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as `logprobs_and_entropy` for `logits = hidden @ weight.T`, hidden [T, H] (replicated over `group`)
    and the output-layer weight shard [V_shard, H]. Materialises the [T, V_shard] logits (the kernel does not)."""
    if is_vocab_parallel(group):
        hidden = _IdentityAllReduceSumBackward.apply(hidden, group)
    logits = hidden @ weight.T
    return logprobs_and_entropy(
        logits, targets, temperature=temperature, vocab_start=vocab_start, group=group, chunk_size=chunk_size
    )
