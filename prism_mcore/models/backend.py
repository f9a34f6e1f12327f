"""The attention backend and FP8 settings of `ModelConfig`: which backend to build, and FP8's TransformerConfig fields.

Both refuse settings this machine cannot run (`te` or FP8 without Transformer Engine, FP8 on the SDPA backend) with
one line naming the key. They import no Megatron, so the CLI runs them on the resolved config before a stage starts
(`cli.check_model_settings`); model building runs them again when it translates the config (`models/build.py`).
"""

from __future__ import annotations

from typing import Literal

import torch

from prism_mcore.runtime.compat import has_transformer_engine

Backend = Literal["te", "sdpa"]

# ModelConfig.fp8 -> Megatron's fp8_recipe: "current" is per-tensor current scaling, which Megatron calls tensorwise.
_FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}


def resolve_backend(requested: str) -> Backend:
    """ModelConfig.attention_backend -> the backend to build ("auto": TE when CUDA and TE are both present)."""
    if requested == "auto":
        return "te" if torch.cuda.is_available() and has_transformer_engine() else "sdpa"
    if requested == "te" and not has_transformer_engine():
        raise ValueError("model.attention_backend='te' needs transformer-engine installed; use 'sdpa' or 'auto'")
    if requested not in ("te", "sdpa"):
        raise ValueError(f"model.attention_backend must be auto, te or sdpa, got {requested!r}")
    return requested  # type: ignore[return-value]


def fp8_settings(fp8: str, backend: Backend) -> dict[str, str]:
    """The TransformerConfig fields of `model.fp8`; empty for "none".

    FP8 runs the GEMMs of the language-model layers in Transformer Engine's FP8 (the `hybrid` format: e4m3 for
    weights and activations, e5m2 for gradients), with delayed scaling (amax history) or current per-tensor scaling
    (Megatron's `tensorwise`, TE >= 2.2). The vision tower, the output layer and the value head stay in bf16: the
    bridge's vision config does not inherit `fp8`, and Megatron's output layer is outside the FP8 layer contexts.
    TE's FP8 GEMMs need the token count of a micro-batch to be a multiple of 16: the forward steps pad to it
    (`inputs.token_multiple`).
    Refused, with one line naming the setting, without transformer-engine or on the torch SDPA backend.
    """
    if fp8 == "none":
        return {}
    if fp8 not in _FP8_RECIPES:
        raise ValueError(f"model.fp8 must be none, delayed or current, got {fp8!r}")
    if not has_transformer_engine():
        raise ValueError(
            f"model.fp8={fp8!r} needs transformer-engine, which is not installed: install it (PRISM_EXTRAS=gpu) "
            "or set model.fp8=none"
        )
    if backend != "te":
        raise ValueError(
            f"model.fp8={fp8!r} needs Transformer Engine layers, but the {backend!r} backend was chosen: set "
            "model.attention_backend to 'te' (or 'auto' on a GPU)"
        )
    return {"fp8": "hybrid", "fp8_recipe": _FP8_RECIPES[fp8]}
