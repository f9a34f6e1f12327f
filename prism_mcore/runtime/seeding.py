"""Seeding: every random generator a rank draws from, set from the run seed, once per process and again per stage.

A stage draws from the process-wide generators (the discriminator's value-head dropout, Megatron's dropout streams),
so their state when it starts must not depend on what ran before it in the same process: a first-use build of the
embedded default, an earlier stage, an evaluation. Each stage therefore reseeds them with `stage_seed(seed, stage)`
when it starts, a pure function of the run seed and the stage name (CRC-32, not Python's salted `hash`), so a stage
run alone, after the others, or after a restart of the pipeline draws the same numbers. A stage resumed from a
checkpoint then replaces these states with the ones saved at that step (`training.resume`).
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import torch


def stage_seed(seed: int, stage: str) -> int:
    """The seed of `stage` in a run seeded with `seed`: the same in every process, whatever PYTHONHASHSEED is.

    In [0, 2**32) (NumPy's range); Megatron adds small offsets to it for its tensor- and expert-parallel streams.
    """
    return zlib.crc32(f"prism-stage/{stage}/{seed}".encode())


def seed_everything(seed: int, stage: str | None = None) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device), and Megatron's model-parallel RNG tracker when its
    groups exist; with `stage`, from `stage_seed(seed, stage)` instead of `seed`.

    Megatron's tracker gives TP ranks different dropout streams and the DP ranks identical ones (seed + 2718 + tp
    rank for the model-parallel state, seed + 1024 + 100·ep rank for experts), so results do not depend on layout.
    Without CUDA the tracker holds CPU generator states (`runtime.compat`), seeded by the same call.
    """
    if stage is not None:
        seed = stage_seed(seed, stage)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
