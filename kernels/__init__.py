"""Triton kernels of prism_mcore (installed as `prism_kernels`), each equal to a plain-torch reference in
`prism_mcore.algorithms` and dispatched to it where Triton cannot or should not run.

| module                | entry point                          | reference (prism_mcore.algorithms) |
|-----------------------|--------------------------------------|------------------------------------|
| `alignment_advantage` | `fused_alignment_advantage`          | `alignment_advantage`              |
| `discriminator_loss`  | `fused_discriminator_loss`           | `discriminator_loss`               |
| `linear_logprobs`     | `fused_linear_logprobs_and_entropy`  | `linear_logprobs_and_entropy`      |

Each entry point takes the reference's arguments plus `backend` ("auto", "triton", "torch"; default from the
`PRISM_KERNEL_BACKEND` environment variable, else "auto" = Triton for CUDA tensors, the reference otherwise).

There is deliberately no fused policy loss. The PPO/GSPO loss is a dozen element-wise operations and two masked
sums over the [B, L] response tokens of a micro-batch (about 10^4 tokens): a few microseconds of memory-bound work
next to the log-prob computation it consumes (T x V x H multiply-adds, ~10^13 for 8k tokens of Qwen3-VL), and its
backward is free through autograd. A kernel would save nothing measurable and would need its own backward.

Without CUDA, Triton kernels can only run in its interpreter (the tests use it to check the kernels on CPU). Triton
chooses between compiling and interpreting when a kernel is *decorated*, i.e. when its module is imported, so the
interpreter is selected here, before any kernel module is loaded; an explicit TRITON_INTERPRET setting wins.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# From the repository root this folder is also importable as the bare `kernels`, the name of Hugging Face's kernels
# library. transformers probes for that library (`is_kernels_available()`, e.g. when flash attention is requested but
# missing): finding no distribution metadata it imports this package and parses its `__version__`, and "N/A" raises
# InvalidVersion. A version below any transformers accepts makes the probe answer "not available".
if __name__ == "kernels":
    __version__ = "0"
