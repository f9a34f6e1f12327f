"""Per-stage seeding: a stage's seed is a fixed function of the run seed and the stage name, and reseeding for a
stage gives the same draws from every generator (Python, NumPy, torch, Megatron's tracker) whatever ran before."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch

from prism_mcore.config.schema import STAGES, ParallelConfig
from prism_mcore.runtime import init_distributed, seed_everything, stage_seed


@pytest.fixture(scope="module", autouse=True)
def _model_parallel_groups() -> None:
    init_distributed(ParallelConfig(), seed=0)  # the tracker is seeded only once Megatron's groups exist


def _draws() -> tuple:
    """One number from each generator a stage may draw from."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():  # the tensor-parallel stream (attention dropout)
        tensor_parallel = torch.rand(4)
    return random.random(), float(np.random.rand()), torch.rand(4), tensor_parallel


def _same(first: tuple, second: tuple) -> bool:
    return all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(first, second, strict=True))


def test_stage_seed_is_the_crc32_of_stage_and_run_seed() -> None:
    # CRC-32, not Python's hash(): the same in every process whatever PYTHONHASHSEED is. The value is pinned, since
    # changing the derivation changes every run's numbers.
    assert stage_seed(42, "warmup") == zlib.crc32(b"prism-stage/warmup/42") == 0x2CADC6CF
    seeds = {stage_seed(seed, stage) for seed in (0, 1, 42) for stage in STAGES}
    assert len(seeds) == 3 * len(STAGES) and all(0 <= seed < 2**32 for seed in seeds)


def test_a_stage_draws_the_same_numbers_whatever_ran_before_it() -> None:
    seed_everything(7, "warmup")
    fresh = _draws()
    # What may run before a stage in the same process: an earlier stage, a build consuming random numbers.
    seed_everything(7, "sft")
    _draws()
    torch.rand(1000)
    np.random.rand(10)
    random.random()
    seed_everything(7, "warmup")
    assert _same(_draws(), fresh)
    seed_everything(7, "align")
    assert not any(_same((a,), (b,)) for a, b in zip(_draws(), fresh, strict=True))  # other stages, other numbers
    seed_everything(8, "warmup")
    assert not any(_same((a,), (b,)) for a, b in zip(_draws(), fresh, strict=True))  # other run seeds too
