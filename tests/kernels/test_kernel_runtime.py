"""Backend selection between the Triton kernels and their torch references."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from prism_kernels import runtime
from prism_kernels.runtime import BACKEND_ENV, Backend, resolve_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_picks_triton_only_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(None, CUDA) is Backend.TRITON
    assert resolve_backend(None, CPU) is Backend.TORCH
    assert resolve_backend("auto", CPU) is Backend.TORCH


def test_environment_variable_and_argument(monkeypatch):
    monkeypatch.setattr(runtime, "interpreting", lambda: True)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert resolve_backend(None, CPU) is Backend.TRITON
    assert resolve_backend("torch", CPU) is Backend.TORCH  # the argument wins over the environment
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError):
        resolve_backend(None, CPU)


@pytest.mark.parametrize(("interpreting", "complete"), [(False, False), (True, False)])
def test_triton_on_cpu_needs_the_interpreter_from_the_start(monkeypatch, interpreting, complete):
    # (True, False): TRITON_INTERPRET was set only after triton had been imported.
    monkeypatch.setattr(runtime, "interpreting", lambda: interpreting)
    monkeypatch.setattr(runtime, "interpreter_complete", lambda: complete)
    with pytest.raises(RuntimeError, match="before anything imports triton"):
        resolve_backend("triton", CPU)


def test_interpreter_is_selected_without_cuda():
    without_cuda = not torch.cuda.is_available()
    assert runtime.interpreting() is without_cuda
    assert runtime.interpreter_complete() is without_cuda


def test_importing_triton_before_prism_kernels_gives_a_clear_error():
    # A fresh interpreter where triton comes first: its helpers are compiled-mode, the kernels cannot run on CPU.
    script = (
        "import triton, torch\n"
        "from prism_kernels.runtime import resolve_backend\n"
        "try:\n"
        "    resolve_backend('triton', torch.device('cpu'))\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert "before anything imports triton" in result.stdout


def test_dot_settings():
    assert runtime.dot_precision(torch.float32) == "ieee"
    assert runtime.dot_precision(torch.bfloat16) == "tf32"
    assert runtime.upcast_dot_operands(torch.bfloat16) is runtime.interpreting()
    assert runtime.upcast_dot_operands(torch.float32) is False
