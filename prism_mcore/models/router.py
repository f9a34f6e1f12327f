"""Router logits of the MoE discriminator, handed to the caller for the load-balancing loss (PRISM_SPEC §2.5, §8.8).

Megatron-Core adds its own load-balancing loss inside the router through an autograd hook, with a per-layer formula
and a 1/top_k normalisation that differ from the reference (transformers' Qwen3-VL-MoE concatenates all layers'
router logits and computes one Switch loss). prism_mcore therefore always builds the discriminator with Megatron's
aux loss off (`moe_aux_loss_coeff=0`) and computes the reference loss explicitly:

    with record_router_logits(model) as router_logits:
        output = model(...)
    aux = router_load_balancing_loss(router_logits, top_k, token_mask)   # warmup: loss += coef * aux

Warmup adds it (coefficient `warmup.aux_loss_coef`, 0.01); alignment simply does not record (no aux loss in stage 2,
§3.1). Recording costs nothing when no recorder is active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from megatron.bridge.models.conversion.param_mapping import AutoMapping
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.moe.router import TopKRouter

from prism_mcore.algorithms.moe_aux import load_balancing_loss


class RecordingTopKRouter(TopKRouter):
    """Megatron's top-k router that also appends each forward's router logits to the active recorder."""

    recorder: list[torch.Tensor] | None = None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        logits = super().gating(input)
        if self.recorder is not None:
            if self.config.sequence_parallel:
                # Each TP rank routes its own sequence shard; the loss needs all tokens. The backward only splits
                # (no reduction), since every TP rank computes the same replicated loss from the gathered logits.
                logits_for_loss = gather_from_sequence_parallel_region(
                    logits, tensor_parallel_output_grad=False, group=self.tp_group
                )
            else:
                logits_for_loss = logits
            self.recorder.append(logits_for_loss)
        return logits


# Megatron-Bridge picks how to shard/gather a weight from its module's class name; routers are replicated.
AutoMapping.register_module_type(RecordingTopKRouter.__name__, "replicated")


@contextlib.contextmanager
def record_router_logits(model: torch.nn.Module | Sequence[torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect the router logits, one `[s, b, experts]` tensor per MoE layer in execution (= layer) order.

    Forwards inside the block append to the same list; with pipeline parallelism each stage sees only its own layers.
    """
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    routers = [module for chunk in chunks for module in chunk.modules() if isinstance(module, RecordingTopKRouter)]
    if not routers:
        raise ValueError("the model has no MoE routers to record (is it the MoE discriminator?)")
    recorded: list[torch.Tensor] = []
    for router in routers:
        router.recorder = recorded
    try:
        yield recorded
    finally:
        for router in routers:
            router.recorder = None


def router_load_balancing_loss(
    router_logits: Sequence[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference's Switch aux loss over all layers (`algorithms.moe_aux`) from recorded router logits.

    `router_logits` are `[s, b, E]` per layer as recorded (packed THD batches: `[t, 1, E]`); `token_mask` is the
    `[b, s]` mask of real tokens of a padded batch, or None when every token counts (packed batches).
    """
    batch_major = [logits.transpose(0, 1).reshape(-1, logits.shape[-1]) for logits in router_logits]
    return load_balancing_loss(batch_major, top_k=top_k, attention_mask=token_mask)
