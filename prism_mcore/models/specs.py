"""Layer specs for the two attention backends: Transformer Engine, or Megatron's local modules with torch SDPA.

`te`   Transformer Engine layers everywhere (fused LayerNorm-linear, TE core attention with flash/cuDNN kernels,
       grouped-GEMM experts, FP8): the production path on GPUs with transformer-engine installed. These are the specs
       Megatron-Bridge itself uses for Qwen3-VL.
`sdpa` Megatron-Core's local modules (tensor-parallel linears, torch norms, per-expert MLPs) with `SDPAttention`
       (`models/attention.py`) as core attention: CPUs (tests, the embedded default) and GPUs without TE.

`auto` (ModelConfig.attention_backend) picks `te` when CUDA and transformer-engine are both available. Megatron
imports of TE-only classes are safe without TE (they are placeholders until instantiated), so both backends' specs can
be described here; only the chosen one is ever built.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Literal

import torch
from megatron.bridge.models.qwen_vl.modelling_qwen3_vl.utils import PatchMergerSubmodules
from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm, TERowParallelLinear
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.models.vision.vit_layer_specs import (
    get_vit_layer_with_local_spec,
    get_vit_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from prism_mcore.models.attention import SDPAttention
from prism_mcore.models.router import RecordingTopKRouter
from prism_mcore.runtime.compat import has_transformer_engine

Backend = Literal["te", "sdpa"]


def resolve_backend(requested: str) -> Backend:
    """ModelConfig.attention_backend -> the backend to build ("auto": TE when CUDA and TE are both present)."""
    if requested == "auto":
        return "te" if torch.cuda.is_available() and has_transformer_engine() else "sdpa"
    if requested == "te" and not has_transformer_engine():
        raise ValueError("model.attention_backend='te' needs transformer-engine installed; use 'sdpa' or 'auto'")
    if requested not in ("te", "sdpa"):
        raise ValueError(f"model.attention_backend must be auto, te or sdpa, got {requested!r}")
    return requested  # type: ignore[return-value]


def language_layer_spec(backend: Backend, num_experts: int | None) -> ModuleSpec:
    """Qwen3 decoder layer: RMSNorm, QK-norm, SwiGLU MLP or an MoE block (routers record logits on request)."""
    if backend == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=num_experts is not None, qk_layernorm=True
        )
    else:
        # Grouped GEMM needs TE or the grouped_gemm package; the local spec uses one MLP per expert instead.
        spec = get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
        )
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if num_experts is not None:
        moe = spec.submodules.mlp  # partial(MoELayer, submodules=MoESubmodules(...))
        spec.submodules.mlp = partial(
            moe.func,
            *moe.args,
            **{**moe.keywords, "submodules": replace(moe.keywords["submodules"], router=RecordingTopKRouter)},
        )
    return spec


def vision_layer_spec(backend: Backend) -> ModuleSpec:
    """Qwen3-VL vision block: LayerNorm, bidirectional attention over packed images, GELU MLP."""
    if backend == "te":
        return get_vit_layer_with_transformer_engine_spec()
    spec = get_vit_layer_with_local_spec()
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def patch_merger_spec(backend: Backend) -> PatchMergerSubmodules:
    """Norm and two linears of the vision patch merger and the deepstack mergers."""
    if backend == "te":
        return PatchMergerSubmodules(
            patch_norm=TENorm, linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear
        )
    return PatchMergerSubmodules(
        patch_norm=WrappedTorchNorm, linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
    )
