"""Worker: train the tiny Megatron GPT for a few AdamW steps in a given parallel layout and report the losses.

Every layout starts from the same weights: the single-process run saves them with dist-checkpointing (`--save-init`)
and the parallel runs load them (`--init`), resharding for TP/PP. The global batch is the same in every layout: each
DP rank takes its slice, and micro-batches go through `get_forward_backward_func` (pipelined when PP > 1); with
`--split uneven|empty` the DP ranks get unequal shares (the step tops the short rank up with zero-loss fillers).
With `--resume-dir`, the run saves a resumable checkpoint at `--save-at` and, with `--resume`, continues from it.
"""

import argparse
from pathlib import Path
from types import SimpleNamespace

from prism_mcore.config.schema import OptimConfig, ParallelConfig
from prism_mcore.runtime import init_distributed, shutdown
from tests.tiny_gpt import build_gpt, forward_step, microbatches
from tests.torchrun import write_rank_result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--split", default="even", choices=["even", "uneven", "empty"])
    parser.add_argument("--init", required=True, help="dist-checkpoint folder of the initial weights")
    parser.add_argument("--save-init", action="store_true")
    parser.add_argument("--resume-dir", default=None)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    env = init_distributed(ParallelConfig(tensor=args.tp, pipeline=args.pp), seed=1234)
    from megatron.core import dist_checkpointing, parallel_state

    from prism_mcore.training.resume import CheckpointManager
    from prism_mcore.training.step import build_optimizer, train_step, wrap_ddp

    model = build_gpt()
    if args.save_init:
        Path(args.init).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), args.init)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.init))
    models = wrap_ddp([model], use_distributed_optimizer=False)
    optimizer, scheduler = build_optimizer(
        models, OptimConfig(lr=1e-3, weight_decay=0.01, clip_grad=1.0, schedule="cosine", warmup_steps=2),
        total_steps=args.steps, use_distributed_optimizer=False, bf16=False,
    )  # fmt: skip
    manager = CheckpointManager(args.resume_dir, keep_last=2) if args.resume_dir else None
    trainables = {"gpt": SimpleNamespace(models=models, optimizer=optimizer, scheduler=scheduler)}
    start = 0
    if args.resume:
        start = manager.load(manager.latest(), trainables)["step"]

    dp_rank = parallel_state.get_data_parallel_rank()
    losses, grad_norms, lrs = {}, {}, {}
    for step in range(start, args.steps):
        batches = microbatches(step, dp_rank, env.dp, args.split)
        result = train_step(models, optimizer, scheduler, forward_step, batches)
        losses[step + 1], grad_norms[step + 1], lrs[step + 1] = result.metrics["loss"], result.grad_norm, result.lr
        if manager is not None and step + 1 == args.save_at:
            manager.save(step + 1, trainables, meta={"state": {"data_position": step + 1}})
    write_rank_result(args.out, {"losses": losses, "grad_norms": grad_norms, "lrs": lrs, "dp": env.dp})
    shutdown()


if __name__ == "__main__":
    main()
