"""A tiny Megatron GPT (Qwen3-like block: RMSNorm, QK-norm, GQA, SwiGLU, RoPE) and its training data, shared by the
runtime tests: layouts must give the same losses, and a resumed run must continue exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

VOCAB, SEQ, GLOBAL_BATCH, MICRO_BATCH = 128, 16, 8, 2


def build_gpt():
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=128, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        qk_layernorm=True, add_bias_linear=False, layernorm_epsilon=1e-6, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, bias_dropout_fusion=False,
    )  # fmt: skip
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def forward_step(data_iterator, model):
    """Megatron forward step with a global token-mean loss (numerator, token count, metrics)."""
    batch = next(data_iterator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(batch["tokens"].shape[0], -1)
    output = model(batch["tokens"], positions, None, labels=batch["labels"])

    def loss_func(per_token_loss):
        total = per_token_loss.float().sum()
        count = torch.tensor(per_token_loss.numel(), dtype=torch.int)
        return total, count, {"loss": torch.stack([total.detach(), count.float()])}

    return output, loss_func


def microbatches(step: int, dp_rank: int, dp_size: int, split: str = "even") -> list:
    """This DP rank's micro-batches of the global batch of `step` (a deterministic function of the step).

    `split` deals the global batch's micro-batches to the DP ranks: `even` (equal shares), `uneven` (the last rank
    takes one micro-batch, the others share the rest) or `empty` (the last rank takes none and passes a `Filler`).
    """
    from prism_mcore.training.step import Filler

    generator = torch.Generator().manual_seed(1000 + step % 2)  # two batches alternate: the loss must fall
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    batches = [
        {"tokens": tokens[i : i + MICRO_BATCH, :-1], "labels": tokens[i : i + MICRO_BATCH, 1:]}
        for i in range(0, GLOBAL_BATCH, MICRO_BATCH)
    ]
    last = dp_rank == dp_size - 1
    if split == "even" or dp_size == 1:
        per_rank = len(batches) // dp_size
        return batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    kept = len(batches) - (1 if split == "uneven" else 0)  # micro-batches of the ranks before the last
    if last:
        return batches[kept:] or [Filler(batches[0])]
    per_rank = kept // (dp_size - 1)
    return batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]
