"""Backend selection (Triton kernel or torch reference) and the Triton runtime facts the kernels share."""

from __future__ import annotations

import os
from enum import StrEnum

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

BACKEND_ENV = "PRISM_KERNEL_BACKEND"


class Backend(StrEnum):
    AUTO = "auto"  # Triton for CUDA tensors, the torch reference otherwise
    TRITON = "triton"
    TORCH = "torch"


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1), e.g. in CPU tests."""
    return bool(triton.knobs.runtime.interpret)


def interpreter_complete() -> bool:
    """Whether triton.language's own helpers (tl.sum, tl.zeros, ...) were built for the interpreter.

    Triton builds them when it is imported, so if TRITON_INTERPRET=1 was set only after `import triton`, interpreted
    kernels fail inside those helpers ("Cannot call @triton.jit'd outside of the scope of a kernel").
    """
    return isinstance(tl.standard.zeros, InterpretedFunction)


def resolve_backend(requested: Backend | str | None, device: torch.device) -> Backend:
    """The backend to use for tensors on `device`: `requested`, else $PRISM_KERNEL_BACKEND, else auto."""
    choice = Backend(requested or os.environ.get(BACKEND_ENV) or Backend.AUTO)
    if choice is Backend.AUTO:
        return Backend.TRITON if device.type == "cuda" else Backend.TORCH
    if choice is Backend.TRITON and device.type != "cuda":
        if not (interpreting() and interpreter_complete()):
            raise RuntimeError(
                "the Triton backend was requested for CPU tensors, which only Triton's interpreter can run, and it "
                "must be selected before anything imports triton: set TRITON_INTERPRET=1 in the environment (or "
                "import prism_kernels first), or use backend='torch'"
            )
    return choice


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    """Whether kernels must convert `tl.dot` operands to fp32 first.

    Triton 3.9's interpreter stores bf16 as raw uint16 and multiplies those integers in `tl.dot`, so bf16 products
    come out wrong; compiled kernels keep bf16 operands for the tensor cores.
    """
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 products for fp32 inputs (TF32 would miss the 1e-5 tolerance)."""
    return "ieee" if dtype == torch.float32 else "tf32"
