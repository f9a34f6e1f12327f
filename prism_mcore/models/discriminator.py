"""The discriminator's scalar value head and where its per-token scores are read (PRISM_SPEC §2.2, §2.3, §2.5).

D is Qwen3-VL-MoE whose language-model output layer is replaced by `ValueHead` = Dropout(0.1) -> Linear(H, 1,
bias=False), initialised N(0, 0.02²) (the slime critic pattern): Megatron's `GPTModel` calls its output layer on the
final-norm hidden states, so with the head in that slot a forward returns one score per token, `[b, s, 1]` (packed:
`[1, t, 1]`), and no vocabulary projection is ever computed or stored. Dropout is active in train mode and off in
eval mode, as in the reference (scoring runs in eval mode); `record_eval_scores` reads the eval-mode scores off a
training forward (the head without its dropout on the same hidden states), so D's update forward also scores.

Checkpoint names. In Megatron (and so in dist checkpoints) the head is `language_model.output_layer.weight`, shape
`[1, H]`. In HF form it is `v_head.1.weight` next to the backbone's tensors, the reference's name (its `v_head` is
`Sequential(Dropout, Linear)`), so reference D checkpoints load and ours load back; no separate `value_head.pt` is
written. An HF checkpoint without `v_head.1.weight` (a freshly upcycled backbone) gets a new N(0, 0.02²) head. D has
no lm_head: its HF export omits `lm_head.weight` (transformers then initialises an unused one if the folder is
loaded as a `Qwen3VLMoeForConditionalGeneration`).

Reading scores: a packed batch is read at its `score_indices` (`training.forward`: each segment's last real token,
so no padding side is guessed, the reference's ⚠ of §2.5), which padding the batch to a token multiple leaves in place; its last
`cu_seqlens` segment then ends in pad tokens, so segment ends are not the scored tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
from megatron.bridge.models.conversion.param_mapping import ReplicatedMapping
from megatron.bridge.models.qwen_vl.qwen3_vl_bridge import Qwen3VLMoEBridge
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

VALUE_HEAD_HF_NAME = "v_head.1.weight"
VALUE_HEAD_MEGATRON_NAME = "language_model.output_layer.weight"
VALUE_HEAD_DROPOUT = 0.1
VALUE_HEAD_INIT_STD = 0.02


class ValueHead(MegatronModule):
    """Dropout + Linear(H, 1, bias=False) in the output-layer slot of Megatron's GPT model.

    Called as the output layer is, `head(hidden [s, b, H], weight=None, runtime_gather_output=None)`, and returns
    `(scores [s, b, 1], None)`. The head is replicated on every tensor-parallel rank (it is one row).
    """

    recorder: list[torch.Tensor] | None = None  # set by `record_eval_scores`

    def __init__(self, config: TransformerConfig, dropout: float = VALUE_HEAD_DROPOUT) -> None:
        super().__init__(config=config)
        self.dropout = torch.nn.Dropout(dropout)
        self.weight = torch.nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.params_dtype))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """N(0, 0.02²), drawn in fp32 from `generator` so that every rank holding the head draws the same values."""
        values = torch.randn(self.weight.shape, generator=generator, dtype=torch.float32) * VALUE_HEAD_INIT_STD
        with torch.no_grad():
            self.weight.copy_(values)

    def forward(
        self, hidden_states: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None
    ) -> tuple[torch.Tensor, None]:
        # `weight` is the tied embedding Megatron would pass to a vocabulary projection; a value head ignores it.
        if self.config.sequence_parallel:
            # Scores are replicated over TP ranks, so the backward only splits the gradient (no reduction).
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        scores = torch.nn.functional.linear(self.dropout(hidden_states), self.weight)
        if self.recorder is not None:
            # The same hidden states without the head's dropout (the backbone has none): the eval-mode scores.
            with torch.no_grad():
                clean = scores if not self.training else torch.nn.functional.linear(hidden_states, self.weight)
            self.recorder.append(clean.detach().transpose(0, 1))
        return scores, None


def attach_value_head(chunks: list[torch.nn.Module], generator: torch.Generator) -> list[torch.nn.Module]:
    """Replace the output layer of the last pipeline stage's language model by a freshly initialised `ValueHead`."""
    for chunk in chunks:
        language_model = chunk.language_model
        if language_model.post_process:
            head = ValueHead(language_model.config).to(next(language_model.parameters()).device)
            head.reset_parameters(generator)
            language_model.output_layer = head
    return chunks


@contextlib.contextmanager
def record_eval_scores(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect, for each forward inside the block, the value head's scores without dropout, `[b, s, 1]` detached:
    what an eval-mode forward would return, read off a training forward's own hidden states (one pass of D gives
    both the update's scores and the advantage's, PRISM_SPEC §3.2). Empty on stages without the head."""
    heads = [module for module in model.modules() if isinstance(module, ValueHead)]
    recorded: list[torch.Tensor] = []
    for head in heads:
        head.recorder = recorded
    try:
        yield recorded
    finally:
        for head in heads:
            head.recorder = None


class _ValueHeadMapping(ReplicatedMapping):
    """`language_model.output_layer.weight` <-> `v_head.1.weight`; a headless HF checkpoint keeps the fresh head."""

    def __init__(self) -> None:
        super().__init__(megatron_param=VALUE_HEAD_MEGATRON_NAME, hf_param=VALUE_HEAD_HF_NAME)
        # Build the conversion task even when the source checkpoint has no head (an upcycled backbone), so that
        # exporting such a discriminator still emits its trained head.
        self.allow_hf_name_mismatch = True

    def hf_to_megatron(self, hf_weights: torch.Tensor | None, megatron_module: torch.nn.Module) -> torch.Tensor | None:
        if hf_weights is None:
            return None  # nothing to load: the head keeps its initialisation
        return super().hf_to_megatron(hf_weights, megatron_module)


class DiscriminatorBridge(Qwen3VLMoEBridge):
    """Megatron-Bridge's Qwen3-VL-MoE conversion with the lm_head mapping replaced by the value head's."""

    def mapping_registry(self) -> MegatronMappingRegistry:
        backbone = [m for m in super().mapping_registry().mappings if m.megatron_param != VALUE_HEAD_MEGATRON_NAME]
        return MegatronMappingRegistry(*backbone, _ValueHeadMapping())

    def maybe_modify_loaded_hf_weight(
        self, hf_param: str | dict[str, str], hf_state_dict: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | dict[str, torch.Tensor] | None:
        if hf_param == VALUE_HEAD_HF_NAME and VALUE_HEAD_HF_NAME not in hf_state_dict:
            return None
        return super().maybe_modify_loaded_hf_weight(hf_param, hf_state_dict)
