"""Build the policy and the discriminator as Megatron models from HF checkpoint folders.

    env = init_distributed(cfg.parallel, seed)                      # process groups first
    policy = build_policy(cfg.model, cfg.parallel)                   # Qwen3-VL from cfg.model.policy_path
    disc = build_discriminator(cfg.model, cfg.parallel)              # Qwen3-VL-MoE + value head (PRISM_SPEC §2)

Each returns a `ModelHandle`: the model chunks (one per virtual pipeline stage; this rank's TP/PP/EP shard, wrapped in
Megatron's `Float16Module` when bf16), the Megatron config, and the HF checkpoint they came from, which export
(`models/export.py`) needs for names and layouts. Architecture, sizes and token ids come from the checkpoint's
`config.json` through Megatron-Bridge, so any Qwen3-VL (2B/4B/8B, dense or MoE) loads without code changes; the
policy may also be a Qwen3-VL-MoE checkpoint. Precision follows `model.dtype` (auto: bf16 on GPU, fp32 on CPU) and
the attention backend `model.attention_backend` (auto: Transformer Engine when installed, else torch SDPA).

Models come back in train mode and trainable. The caller wraps them in DDP for training (`training/step.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge
from megatron.bridge.models.hf_pretrained.causal_lm import PreTrainedCausalLM
from megatron.bridge.models.qwen_vl.qwen3_vl_bridge import Qwen3VLBridge, Qwen3VLMoEBridge
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from prism_mcore.config.schema import ModelConfig, ParallelConfig
from prism_mcore.models.backend import resolve_backend
from prism_mcore.models.discriminator import VALUE_HEAD_HF_NAME, DiscriminatorBridge, attach_value_head
from prism_mcore.models.qwen3_vl import configure_provider, prism_provider, resolve_dtype

logger = logging.getLogger(__name__)

_BRIDGES: dict[str, type[MegatronModelBridge]] = {"qwen3_vl": Qwen3VLBridge, "qwen3_vl_moe": Qwen3VLMoEBridge}


@dataclass
class ModelHandle:
    """A built Megatron model and the HF checkpoint it was converted from."""

    chunks: list[torch.nn.Module]  # model chunks of this rank (one per virtual pipeline stage)
    config: TransformerConfig
    hf_path: Path
    bridge: MegatronModelBridge  # HF <-> Megatron name mapping, used by export
    hf_pretrained: PreTrainedCausalLM  # lazy view of the checkpoint (config, tensor names, tokenizer files)

    def train(self, mode: bool = True) -> ModelHandle:
        for chunk in self.chunks:
            chunk.train(mode)
        return self

    def eval(self) -> ModelHandle:
        return self.train(False)


def build_policy(model: ModelConfig, parallel: ParallelConfig, *, path: str | Path | None = None) -> ModelHandle:
    """The policy from `path` or `model.policy_path`."""
    path = _checkpoint_path(path or model.policy_path, "model.policy_path")
    pretrained = PreTrainedCausalLM.from_pretrained(path)
    model_type = pretrained.config.model_type
    if model_type not in _BRIDGES:
        raise ValueError(f"{path}: model_type {model_type!r} is not Qwen3-VL (expected one of {sorted(_BRIDGES)})")
    return _build(path, pretrained, _BRIDGES[model_type](), model, parallel)


def build_discriminator(
    model: ModelConfig, parallel: ParallelConfig, *, path: str | Path | None = None, seed: int = 42
) -> ModelHandle:
    """The MoE discriminator with its value head, from `path` or `model.discriminator_path` (PRISM_SPEC §2.1-2.2).

    A checkpoint holding `v_head.1.weight` restores the head; otherwise (a freshly upcycled backbone) the head is
    drawn from N(0, 0.02²) with a generator seeded by `seed`, identically on every rank.
    """
    path = _checkpoint_path(path or model.discriminator_path, "model.discriminator_path")
    pretrained = PreTrainedCausalLM.from_pretrained(path)
    if pretrained.config.model_type != "qwen3_vl_moe":
        raise ValueError(f"{path}: the discriminator must be a Qwen3-VL-MoE checkpoint (see models/upcycle.py)")
    if VALUE_HEAD_HF_NAME not in pretrained.state:
        logger.info("%s has no %s: initialising a new value head", path, VALUE_HEAD_HF_NAME)
    generator = torch.Generator().manual_seed(seed)
    return _build(path, pretrained, DiscriminatorBridge(), model, parallel, value_head=generator)


def _build(
    path: Path,
    pretrained: PreTrainedCausalLM,
    bridge: MegatronModelBridge,
    model: ModelConfig,
    parallel: ParallelConfig,
    value_head: torch.Generator | None = None,
) -> ModelHandle:
    _check_parallel_state(parallel)
    bridge.hf_pretrained = pretrained
    bridge.hf_config = pretrained.config
    text_config = pretrained.config.text_config
    if getattr(text_config, "num_experts", None) and not getattr(text_config, "norm_topk_prob", True):
        raise ValueError(f"{path}: norm_topk_prob=False routing is not supported (Megatron renormalises top-k)")

    provider = prism_provider(bridge.provider_bridge(pretrained))
    provider.perform_initialization = False  # every weight is loaded below (a new value head is drawn explicitly)
    hooks = []
    if value_head is not None:
        # D has no vocabulary projection to tie to the embedding: its output slot holds the value head.
        provider.share_embeddings_and_output_weights = False
        hooks.append(lambda chunks: attach_value_head(chunks, value_head))
    hooks.append(lambda chunks: bridge.load_weights_hf_to_megatron(pretrained, chunks))
    configure_provider(provider, model, parallel, resolve_backend(model.attention_backend), resolve_dtype(model.dtype))
    chunks = provider.provide_distributed_model(
        wrap_with_ddp=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        pre_wrap_hook=hooks,
    )
    return ModelHandle(chunks=chunks, config=provider, hf_path=path, bridge=bridge, hf_pretrained=pretrained)


def _checkpoint_path(path: str | Path, field: str) -> Path:
    if not path:
        raise ValueError(f"no checkpoint given: set {field} to an HF checkpoint folder")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{field}={path} is not an HF checkpoint folder (no config.json)")
    return path


def _check_parallel_state(parallel: ParallelConfig) -> None:
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call prism_mcore.runtime.init_distributed(parallel) before building models")
    actual = {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "expert": parallel_state.get_expert_model_parallel_world_size(),
        "context": parallel_state.get_context_parallel_world_size(),
    }
    wanted = {name: getattr(parallel, name) for name in actual}
    if actual != wanted:
        raise ValueError(f"parallel config {wanted} differs from the initialised process groups {actual}")
