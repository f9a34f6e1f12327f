"""Vocab-parallel log-probs/entropy over 2 gloo processes equal the single-process result, for both the torch
reference and the Triton kernel (interpreted on CPU; compiled when CUDA is present)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOKENS, VOCAB, HIDDEN, WORLD = 10, 96, 24, 2


def _outputs(fn, hidden, weight, targets, upstream, **kwargs):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    logp, entropy = fn(hidden, weight, targets, temperature=0.9, **kwargs)
    ((upstream[0] * logp).sum() + (upstream[1] * entropy).sum()).backward()
    return logp, entropy, hidden.grad, weight.grad


def _worker(rank: int, init_file: str) -> None:
    from prism_kernels.linear_logprobs import fused_linear_logprobs_and_entropy

    from prism_mcore.algorithms import linear_logprobs_and_entropy

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gen = torch.Generator().manual_seed(0)  # every rank builds the same full problem
        hidden = torch.randn(TOKENS, HIDDEN, generator=gen).to(device)
        weight = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.25).to(device)
        targets = torch.randint(0, VOCAB, (TOKENS,), generator=gen).to(device)
        upstream = torch.randn(2, TOKENS, generator=gen).to(device)
        shard = slice(rank * VOCAB // WORLD, (rank + 1) * VOCAB // WORLD)

        full = _outputs(linear_logprobs_and_entropy, hidden, weight, targets, upstream)
        expected = (*full[:3], full[3][shard])  # each rank owns the weight-gradient rows of its shard
        tp_kwargs = dict(group=dist.group.WORLD, vocab_start=shard.start)
        for name, fn, kwargs in (
            ("reference", linear_logprobs_and_entropy, {}),
            ("kernel", fused_linear_logprobs_and_entropy, dict(backend="triton")),
        ):
            got = _outputs(fn, hidden, weight[shard], targets, upstream, **tp_kwargs, **kwargs)
            for label, g, e in zip(("logp", "entropy", "grad_hidden", "grad_weight"), got, expected, strict=True):
                # fp32 to 1e-5 of the largest magnitude: the sums run in a different order on each side.
                atol = 1e-5 * e.abs().max().item()
                torch.testing.assert_close(g, e, rtol=0, atol=atol, msg=f"rank {rank} {name} {label}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_vocab_parallel_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
