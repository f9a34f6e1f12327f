"""Test-suite wiring: GPU tests skip without CUDA; slow tests run only when asked for; no test leaks its attention
backend setting into the next."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

if not torch.cuda.is_available():
    # Triton picks its CPU interpreter when triton is first imported (importing Megatron imports it), so the choice
    # must be made before any test module is collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    markexpr = config.getoption("-m") or ""
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if "slow" in item.keywords and "slow" not in markexpr:
            item.add_marker(pytest.mark.skip(reason="slow: run with `pytest -m slow`"))


@contextmanager
def _attention_backend_restored() -> Iterator[None]:
    """Megatron's model constructors write their attention-backend choice into os.environ (NVTE_FLASH_ATTN, ...)
    and refuse a conflicting value later: whatever a block writes there is undone when it ends."""
    before = {key: value for key, value in os.environ.items() if key.startswith("NVTE_")}
    yield
    for key in [key for key in os.environ if key.startswith("NVTE_")]:
        del os.environ[key]
    os.environ.update(before)


@pytest.fixture(autouse=True)
def _no_attention_backend_leaks() -> Iterator[None]:
    """One test's choice stays out of the next test's models and child processes."""
    with _attention_backend_restored():
        yield


@pytest.fixture(autouse=True, scope="module")
def _no_attention_backend_leaks_from_modules() -> Iterator[None]:
    """The same for models built by module-scoped fixtures, which are set up before a test's own snapshot."""
    with _attention_backend_restored():
        yield
