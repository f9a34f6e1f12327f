"""Layer specs for the two attention backends: Transformer Engine, or Megatron's local modules with torch SDPA.

`te`   Transformer Engine layers everywhere (fused LayerNorm-linear, TE core attention with flash/cuDNN kernels,
       grouped-GEMM experts, FP8): the production path on GPUs with transformer-engine installed. These are the specs
       Megatron-Bridge itself uses for Qwen3-VL.
`sdpa` Megatron-Core's local modules (tensor-parallel linears, torch norms, per-expert MLPs) with `SDPAttention`
       (`models/attention.py`) as core attention: CPUs (tests, the embedded default) and GPUs without TE.

`auto` (ModelConfig.attention_backend, resolved by `models/backend.py`) picks `te` when CUDA and transformer-engine
are both available. Megatron imports of TE-only classes are safe without TE (they are placeholders until
instantiated), so both backends' specs can be described here; only the chosen one is ever built.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

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
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from prism_mcore.models.attention import SDPAttention
from prism_mcore.models.backend import Backend
from prism_mcore.models.router import RecordingTopKRouter


class SequenceParallelTorchNorm:
    """Megatron's torch LayerNorm/RMSNorm (`WrappedTorchNorm`), allowed under sequence parallelism.

    Megatron refuses torch norms with sequence parallelism only because nothing marks their weights for the gradient
    sum over the tensor-parallel group that sequence-sharded activations need. A norm works token by token, so its
    forward on a sequence shard is the same; this one sets `sequence_parallel` on its parameters, and Megatron's
    `finalize_model_grads` then sums their gradients over the TP ranks, as it does for Transformer Engine's norms.
    Needed because the bridge's Qwen3-VL-MoE turns sequence parallelism on whenever TP > 1.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused) -> torch.nn.Module:
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r} is not supported by the sdpa backend")
        norm = norms[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def language_block_spec(
    backend: Backend, config: TransformerConfig, vp_stage: int | None, pp_rank: int | None
) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder of this pipeline stage: `language_layer_spec` layers and the final norm.

    On TE this is the layer spec (Megatron adds TE's final norm). On sdpa the final norm is named too, so that it,
    like the layers' norms, is a `SequenceParallelTorchNorm`.
    """
    layer = language_layer_spec(backend, config.num_moe_experts)
    if backend == "te":
        return layer
    layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=SequenceParallelTorchNorm)


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
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = SequenceParallelTorchNorm
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
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
