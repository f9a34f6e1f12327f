"""Kernel-test wiring: where the kernels run.

Importing `prism_kernels` selects Triton's interpreter when there is no CUDA (see kernels/__init__.py), so the same
tests check the kernels on CPU at tiny shapes (interpreted) and on a GPU (compiled). Tests marked `gpu` add
realistic shapes.
"""

from __future__ import annotations

import prism_kernels  # noqa: F401  (selects the interpreter before any kernel module is imported)
import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
