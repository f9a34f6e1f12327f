"""Test-suite wiring: GPU tests skip without CUDA; slow tests run only when asked for; no test leaks its attention
backend setting into the next."""

from __future__ import annotations

import os

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


@pytest.fixture(autouse=True)
def _no_attention_backend_leaks() -> None:
    """Megatron's model constructors write their attention-backend choice into os.environ (NVTE_FLASH_ATTN, ...)
    and refuse a conflicting value later: keep one test's choice out of the next test's models and child processes."""
    before = {key: value for key, value in os.environ.items() if key.startswith("NVTE_")}
    yield
    for key in [key for key in os.environ if key.startswith("NVTE_")]:
        del os.environ[key]
    os.environ.update(before)
