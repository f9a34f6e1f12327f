"""Worker: train a tiny Megatron GPT for a few AdamW steps in a given parallel layout and report the losses.

Every layout starts from the same weights: the single-process run saves them with dist-checkpointing (`--save-init`)
and the parallel runs load them (`--load-init`), resharding for TP/PP. The global batch is the same in every layout:
each DP rank takes its slice, and micro-batches go through `get_forward_backward_func` (pipelined when PP > 1).
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from prism_mcore.config.schema import OptimConfig, ParallelConfig
from prism_mcore.runtime import init_distributed, shutdown
from tests.torchrun import write_rank_result

VOCAB, SEQ, GLOBAL_BATCH, MICRO_BATCH = 128, 16, 8, 2


def build_gpt(pre_process: bool, post_process: bool):
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
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
        position_embedding_type="rope", pre_process=pre_process, post_process=post_process,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--init", required=True, help="dist-checkpoint folder of the initial weights")
    parser.add_argument("--save-init", action="store_true")
    args = parser.parse_args()

    env = init_distributed(ParallelConfig(tensor=args.tp, pipeline=args.pp), seed=1234)
    from megatron.core import dist_checkpointing, parallel_state

    from prism_mcore.training.step import build_optimizer, train_step, wrap_ddp

    model = build_gpt(parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage())
    if args.save_init:
        Path(args.init).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), args.init)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.init))
    models = wrap_ddp([model], use_distributed_optimizer=False)
    optimizer, scheduler = build_optimizer(
        models, OptimConfig(lr=1e-3, weight_decay=0.01, clip_grad=1.0), total_steps=args.steps,
        use_distributed_optimizer=False, bf16=False,
    )  # fmt: skip

    generator = torch.Generator().manual_seed(7)
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = GLOBAL_BATCH // env.dp
    positions = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, -1)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], positions, None, labels=batch["labels"])

        def loss_func(per_token_loss):
            total = per_token_loss.float().sum()
            count = torch.tensor(per_token_loss.numel(), dtype=torch.int)
            return total, count, {"loss": torch.stack([total.detach(), count.float()])}

        return output, loss_func

    losses, grad_norms = [], []
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)  # one batch, fitted 5 times
    for _ in range(args.steps):
        mine = tokens[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        microbatches = [
            {"tokens": mine[i : i + MICRO_BATCH, :-1], "labels": mine[i : i + MICRO_BATCH, 1:]}
            for i in range(0, per_rank, MICRO_BATCH)
        ]
        result = train_step(models, optimizer, scheduler, forward_step, microbatches, SEQ, MICRO_BATCH)
        losses.append(result.metrics["loss"])
        grad_norms.append(result.grad_norm)
    write_rank_result(args.out, {"losses": losses, "grad_norms": grad_norms, "dp": env.dp})
    shutdown()


if __name__ == "__main__":
    main()
