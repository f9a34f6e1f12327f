"""Qwen3-VL (dense and MoE) as Megatron-Core models: Megatron-Bridge's architecture with prism_mcore's layer specs.

Megatron-Bridge supplies the Qwen3-VL architecture (vision tower, interleaved MRoPE, deepstack injection) and the
HF <-> Megatron name mapping. Two things are changed, both without touching installed files:

1. Layer specs. The bridge's providers and `Qwen3VLModel.__init__` hard-code Transformer Engine specs. The providers
   below build the same model from `models/specs.py` instead, so the backend (`te` or `sdpa`) is a choice.
2. Shared images. A packed batch may hold each distinct image once (`PackedBatch.image_index`, the segments and
   samples of one prompt): the tower encodes it once, and `index_select` gives each sequence's image tokens their
   copy of the embeddings (and deepstack features), so autograd sums the copies' gradients into the one encoding.
   Across the micro-batches of a step, `StepImages` (installed by `step_images` around a training step) keeps each
   image's encoding (`PackedBatch.image_keys`) and hands later micro-batches a leaf holding the same values; the
   leaves collect those micro-batches' gradients, and `StepImages.backward` sends their sum through the tower once
   before the step's gradients are reduced. The tower's gradient is then J^T(sum of g) instead of the sum of J^T g:
   the same up to float rounding.
3. Exact GELU in the vision patch merger and the deepstack mergers. Transformers' Qwen3-VL (and so SGLang/vLLM, the
   rollout engines) use `nn.GELU()` there; the bridge reuses the vision blocks' tanh approximation, which shifts the
   logits by ~5e-5 in fp32 (a train/rollout mismatch). With exact GELU, Megatron logits match transformers to fp32
   rounding (tests/unit/models/test_parity.py).

`configure_provider` is the one place where prism_mcore's `ModelConfig`/`ParallelConfig` become Megatron
`TransformerConfig` fields; everything else comes from the checkpoint's own `config.json` through the bridge, so
Qwen3-VL-2B/4B/8B (and the MoE variants) load without code changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from megatron.bridge.models.qwen_vl.modelling_qwen3_vl.attention import Qwen3VLSelfAttention
from megatron.bridge.models.qwen_vl.modelling_qwen3_vl.model import Qwen3VLModel
from megatron.bridge.models.qwen_vl.modelling_qwen3_vl.transformer_config import get_vision_model_config
from megatron.bridge.models.qwen_vl.modelling_qwen3_vl.vision_model import Qwen3VLVisionModel
from megatron.bridge.models.qwen_vl.qwen3_vl_provider import Qwen3VLModelProvider, Qwen3VLMoEModelProvider
from megatron.core.transformer.enums import AttnBackend

from prism_mcore.config.schema import ModelConfig, ParallelConfig
from prism_mcore.models.backend import Backend, fp8_settings
from prism_mcore.models.specs import language_block_spec, patch_merger_spec, vision_layer_spec

# The vision blocks of every released Qwen3-VL use tanh-GELU, which is what the bridge's vision config implements.
_VISION_BLOCK_ACTIVATION = "gelu_pytorch_tanh"

# TransformerConfig fusions that need CUDA kernels from TE or Apex; the sdpa backend runs the plain torch ops.
_GPU_FUSIONS = (
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "gradient_accumulation_fusion",
    "moe_permute_fusion",
)


class StepImages:
    """Each distinct image of a training step (or of a forward-only pass) through the vision tower once.

    `encode` returns a micro-batch's image embeddings and deepstack features per grid row, encoding only the images
    (by `PackedBatch.image_keys`) this step has not seen. Under autograd, every micro-batch gets leaves detached from
    the encoding (its own backward stops there and adds into the leaves' `.grad`); `backward` then runs the tower's
    backward once with the summed gradients. Megatron's schedule frees each micro-batch's graph after its backward,
    so the leaves are what makes the encoding reusable by the later micro-batches (and by pipeline schedules that
    interleave forwards and backwards). `encoded_images` counts the images encoded.
    """

    def __init__(self) -> None:
        self._outputs: dict[str, list[torch.Tensor]] = {}  # key -> [embeddings, *deepstack features], with graph
        self._leaves: dict[str, list[torch.Tensor]] = {}
        self.encoded_images = 0

    def encode(
        self, tower: Qwen3VLVisionModel, pixels: torch.Tensor, grid_thw: torch.Tensor, keys: Sequence[str]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        patches = grid_thw.prod(dim=-1).tolist()
        missing = [row for row, key in enumerate(keys) if key not in self._leaves]
        if missing:
            starts = [0, *itertools.accumulate(patches)]
            if len(missing) == len(keys):
                new_pixels, new_grid = pixels, grid_thw
            else:
                rows = torch.cat([torch.arange(starts[r], starts[r + 1]) for r in missing]).to(pixels.device)
                new_pixels = pixels.index_select(0, rows)
                new_grid = grid_thw.index_select(0, torch.tensor(missing, device=grid_thw.device))
            embeds, deepstack = Qwen3VLVisionModel.forward(tower, hidden_states=new_pixels, grid_thw=new_grid)
            tokens = [patches[r] // tower.spatial_merge_unit for r in missing]
            pieces = [output.split(tokens) for output in (embeds, *deepstack)]
            for position, row in enumerate(missing):
                outputs = [per_output[position] for per_output in pieces]
                self._outputs[keys[row]] = outputs
                # fp32 leaves: the gradients of every use are summed in fp32 (as Megatron's fp32 gradient buffers
                # summed the per-micro-batch tower gradients before), whatever the model's precision.
                self._leaves[keys[row]] = [
                    output.detach().float().requires_grad_(output.requires_grad) for output in outputs
                ]
            self.encoded_images += len(missing)
        dtype = self._outputs[keys[0]][0].dtype
        per_output = zip(*(self._leaves[key] for key in keys), strict=True)
        embeds, *deepstack = [torch.cat(list(outputs)).to(dtype) for outputs in per_output]
        return embeds, deepstack

    def backward(self) -> None:
        """The tower's backward for every encoding whose leaves received a gradient; then forget the encodings."""
        outputs, grads = [], []
        for key, leaves in self._leaves.items():
            for output, leaf in zip(self._outputs[key], leaves, strict=True):
                if leaf.grad is not None and output.requires_grad:
                    outputs.append(output)
                    grads.append(leaf.grad.to(output.dtype))
        self.clear()
        if outputs:
            torch.autograd.backward(outputs, grads)

    def clear(self) -> None:
        self._outputs.clear()
        self._leaves.clear()


class SharedImageVisionModel(Qwen3VLVisionModel):
    """The bridge's vision tower, which encodes each distinct image once and hands out one copy of its merged
    embeddings (and deepstack features) per image of the batch's sequences when `image_index` is set; with a
    `StepImages` installed and `image_keys` set, once per step."""

    image_index: torch.Tensor | None = None  # set by `PrismQwen3VLModel.forward` around the call
    image_keys: Sequence[str] | None = None  # likewise
    step_images: StepImages | None = None  # set by `step_images` around a step

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs) -> tuple:
        if self.step_images is not None and self.image_keys is not None and not kwargs:
            embeds, deepstack = self.step_images.encode(self, hidden_states, grid_thw, self.image_keys)
        else:
            embeds, deepstack = super().forward(hidden_states=hidden_states, grid_thw=grid_thw, **kwargs)
        if self.image_index is None:
            return embeds, deepstack
        tokens = (grid_thw.prod(dim=-1) // self.spatial_merge_unit).tolist()
        starts = [0, *itertools.accumulate(tokens)]
        rows = torch.cat([torch.arange(starts[i], starts[i] + tokens[i]) for i in self.image_index.tolist()]).to(
            embeds.device
        )
        return embeds.index_select(0, rows), [features.index_select(0, rows) for features in deepstack]


@contextmanager
def step_images(models: Sequence[torch.nn.Module]) -> Iterator[StepImages]:
    """A `StepImages` serving every Qwen3-VL vision tower in `models` (any wrapping) inside the block; the caller
    runs its `backward` before the step's gradients are reduced. Encodings are dropped on exit (the weights change)."""
    images = StepImages()
    towers = [module for model in models for module in model.modules() if isinstance(module, SharedImageVisionModel)]
    for tower in towers:
        tower.step_images = images
    try:
        yield images
    finally:
        for tower in towers:
            tower.step_images = None
        images.clear()


class PrismQwen3VLModel(Qwen3VLModel):
    """The bridge's `Qwen3VLModel` with the vision tower built from the given specs and HF-exact merger GELU."""

    def __init__(
        self,
        config: Qwen3VLModelProvider | Qwen3VLMoEModelProvider,
        backend: Backend,
        pre_process: bool,
        post_process: bool,
        vp_stage: int | None = None,
    ) -> None:
        pp_rank = config._pg_collection.pp.rank() if config._pg_collection is not None else None
        # add_encoder=False skips the parent's vision tower, which is hard-wired to Transformer Engine modules.
        super().__init__(
            language_transformer_config=config,
            language_transformer_layer_spec=language_block_spec(backend, config, vp_stage, pp_rank),
            vision_transformer_config=config.vision_config,
            pre_process=pre_process,
            post_process=post_process,
            add_encoder=False,
            pg_collection=config._pg_collection,
            vp_stage=vp_stage,
        )
        self.add_encoder = True
        if not pre_process:
            return  # the vision tower lives on the first pipeline stage only
        hf_vision = config.vision_config
        if hf_vision.hidden_act != _VISION_BLOCK_ACTIVATION:
            raise ValueError(
                f"vision hidden_act {hf_vision.hidden_act!r} is not supported ({_VISION_BLOCK_ACTIVATION})"
            )
        vision_config = get_vision_model_config(hf_vision, megatron_config=config)
        vision_config.pipeline_model_parallel_size = 1  # the tower is not pipelined
        vision_config.first_pipeline_num_layers = None
        layer_spec = vision_layer_spec(backend)
        layer_spec.submodules.self_attention.module = Qwen3VLSelfAttention  # 2-D rotary positions of the patches
        self.vision_model = SharedImageVisionModel(
            vision_config,
            layer_spec,
            patch_merger_spec(backend),
            pre_process=True,
            post_process=True,
            pg_collection=self.pg_collection,
        )
        for merger in (self.vision_model.merger, *self.vision_model.decoder.deepstack_merger_list):
            merger.activation_func = F.gelu  # exact, as transformers' Qwen3VLVisionPatchMerger (nn.GELU())

    def forward(
        self,
        *args,
        image_index: torch.Tensor | None = None,
        image_keys: Sequence[str] | None = None,
        **kwargs,
    ):
        """The bridge's forward; `image_index` (see `data.batching.PackedBatch`) maps each image of the sequences to
        a row of `image_grid_thw`, which then lists each distinct image once, named by `image_keys`."""
        if image_index is None or not self.pre_process:
            return super().forward(*args, **kwargs)
        if kwargs.get("position_ids") is None or self.pg_collection.cp.size() > 1:
            # Positions derived from grids, or images split over context-parallel ranks: one copy per image.
            return super().forward(*args, **_images_expanded(kwargs, image_index))
        self.vision_model.image_index = image_index
        self.vision_model.image_keys = image_keys
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.vision_model.image_index = None
            self.vision_model.image_keys = None


def _images_expanded(kwargs: dict, image_index: torch.Tensor) -> dict:
    """Forward arguments with one copy of the pixels and grid row per image of the sequences."""
    grid = kwargs["image_grid_thw"]
    patches = grid.prod(dim=-1).tolist()
    starts = [0, *itertools.accumulate(patches)]
    rows = torch.cat([torch.arange(starts[i], starts[i] + patches[i]) for i in image_index.tolist()])
    pixel_values = kwargs["pixel_values"]
    return {
        **kwargs,
        "pixel_values": pixel_values.index_select(0, rows.to(pixel_values.device)),
        "image_grid_thw": grid.index_select(0, image_index.to(grid.device)),
    }


@dataclass
class PrismQwen3VLProvider(Qwen3VLModelProvider):
    """Dense Qwen3-VL provider that builds `PrismQwen3VLModel` with the configured backend's specs."""

    backend: Backend = "sdpa"

    def provide(self, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None):
        return PrismQwen3VLModel(self, self.backend, pre_process, post_process, vp_stage)


@dataclass
class PrismQwen3VLMoeProvider(Qwen3VLMoEModelProvider):
    """Qwen3-VL-MoE provider that builds `PrismQwen3VLModel` with the configured backend's specs."""

    backend: Backend = "sdpa"

    def provide(self, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None):
        return PrismQwen3VLModel(self, self.backend, pre_process, post_process, vp_stage)


def prism_provider(
    bridge_provider: Qwen3VLModelProvider | Qwen3VLMoEModelProvider,
) -> PrismQwen3VLProvider | PrismQwen3VLMoeProvider:
    """Re-type the provider the bridge derived from an HF config as the matching prism provider (same fields).

    Bridge providers defer validation to `finalize()`, so copying the fields is a plain dataclass construction.
    """
    cls = PrismQwen3VLMoeProvider if isinstance(bridge_provider, Qwen3VLMoEModelProvider) else PrismQwen3VLProvider
    values = {f.name: getattr(bridge_provider, f.name) for f in fields(bridge_provider) if f.init}
    return cls(**values)


def resolve_dtype(requested: str) -> torch.dtype:
    """ModelConfig.dtype -> torch dtype ("auto": bf16 on GPU, fp32 on CPU)."""
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[requested]


def configure_provider(
    provider: PrismQwen3VLProvider | PrismQwen3VLMoeProvider,
    model: ModelConfig,
    parallel: ParallelConfig,
    backend: Backend,
    dtype: torch.dtype,
) -> None:
    """Translate prism_mcore's model and parallel settings into the provider (a Megatron TransformerConfig).

    Architecture fields (sizes, heads, rope, vocab, experts, token ids) are left as the bridge read them from the
    checkpoint. Finalizes the provider (Megatron's config validation and derived fields).
    """
    is_moe = provider.num_moe_experts is not None
    provider.backend = backend
    provider.tensor_model_parallel_size = parallel.tensor
    provider.pipeline_model_parallel_size = parallel.pipeline
    provider.virtual_pipeline_model_parallel_size = parallel.virtual_pipeline
    provider.context_parallel_size = parallel.context
    provider.expert_model_parallel_size = parallel.expert if is_moe else 1
    provider.sequence_parallel = parallel.sequence_parallel

    provider.params_dtype = dtype
    provider.pipeline_dtype = dtype
    provider.bf16 = dtype == torch.bfloat16
    provider.fp16 = False

    if backend == "te":
        provider.attention_backend = AttnBackend.auto
    else:
        provider.attention_backend = AttnBackend.local
        for fusion in _GPU_FUSIONS:
            setattr(provider, fusion, False)
    for name, value in fp8_settings(model.fp8, backend).items():
        setattr(provider, name, value)

    if model.recompute_activations:
        provider.recompute_granularity = "full"
        provider.recompute_method = "uniform"
        provider.recompute_num_layers = 1

    if is_moe:
        if model.moe_token_dispatcher == "alltoall" and not torch.cuda.is_available():
            raise ValueError("the alltoall MoE token dispatcher needs CUDA streams; use allgather on CPU")
        provider.moe_token_dispatcher_type = model.moe_token_dispatcher
        provider.moe_grouped_gemm = backend == "te"
        # The load-balancing loss is computed by the caller from recorded router logits (models/router.py).
        provider.moe_aux_loss_coeff = 0.0

    provider.finalize()
    if parallel.pipeline > 1:
        # Packed micro-batches differ in length, so pipeline stages must exchange shapes before activations. Set
        # after finalize(): Megatron's check against the allgather MoE dispatcher fires for dense models too.
        if is_moe and provider.moe_token_dispatcher_type == "allgather":
            raise ValueError(
                "pipeline parallelism of MoE models needs model.moe_token_dispatcher='alltoall', which needs CUDA; "
                "on CPU use tensor, expert or data parallelism"
            )
        provider.variable_seq_lengths = True
