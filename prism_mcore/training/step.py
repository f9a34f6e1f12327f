"""The one Megatron train step every stage uses: micro-batches through `get_forward_backward_func`, DDP gradient
reduction, AdamW with an LR schedule, gradient clipping, and a skipped update when the gradient norm is not finite.

Loss contract. A stage supplies `forward_step(data_iterator, model) -> (output, loss_func)` as Megatron expects;
`loss_func(output)` returns `(loss_numerator, loss_denominator, metrics)`. Megatron sums numerators over the
micro-batches and data-parallel ranks and divides every gradient by the summed denominators
(`calculate_per_token_loss`). So a global token-mean returns (Σ token losses, number of tokens), and the reference's
per-micro-batch mean averaged over micro-batches (PRISM_SPEC §5.2) returns (micro-batch mean, 1). `metrics` maps a
name to a `[sum, count]` tensor; the step reports sum/count over all micro-batches and DP ranks, on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from prism_mcore.config.schema import OptimConfig
from prism_mcore.models import step_images

ForwardStep = Callable[[Iterator[Any], torch.nn.Module], tuple[torch.Tensor, Callable]]


@dataclass
class StepResult:
    metrics: dict[str, float]
    grad_norm: float
    lr: float
    skipped: bool
    filler_microbatches: int = 0  # on this rank


def wrap_ddp(models: list[torch.nn.Module], use_distributed_optimizer: bool) -> list[DistributedDataParallel]:
    """Wrap model chunks in Megatron DDP: gradient buffers in fp32, reduced across DP (and CP) ranks.

    Gradients are summed, not averaged, in the collective: the per-token division happens once, in
    `finalize_model_grads`, with the global denominator (see the module docstring).
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        average_in_collective=False,
    )
    config = get_model_config(models[0])
    config.calculate_per_token_loss = True
    # Packed micro-batches differ in length: pipeline stages exchange tensor shapes before each activation.
    config.variable_seq_lengths = True
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=model, disable_bucketing=index > 0)
        for index, model in enumerate(models)
    ]
    config.no_sync_func = wrapped[0].no_sync if len(wrapped) == 1 else [m.no_sync for m in wrapped]
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(
    models: list[torch.nn.Module],
    optim: OptimConfig,
    total_steps: int,
    use_distributed_optimizer: bool,
    bf16: bool,
) -> tuple[Any, OptimizerParamScheduler]:
    """AdamW (PRISM_SPEC: betas, eps, weight decay, clip 1.0) and a constant or warmup+cosine LR schedule."""
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.beta1,
            adam_beta2=optim.beta2,
            adam_eps=optim.eps,
            clip_grad=optim.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        models,
    )
    total_steps = max(total_steps, 1)
    warmup = optim.warmup_steps or int(round(optim.warmup_ratio * total_steps))
    if warmup >= total_steps:
        raise ValueError(
            f"{warmup} learning-rate warmup steps leave nothing of a {total_steps}-step schedule: "
            "lower the optimizer's warmup_steps / warmup_ratio or train more steps"
        )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr if optim.schedule == "cosine" else optim.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total_steps,
        lr_decay_style=optim.schedule,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _reduce_metrics(per_microbatch: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum `[sum, count]` metric pairs over micro-batches and DP ranks; make them known to every PP stage."""
    names = sorted(per_microbatch[0]) if per_microbatch else []
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # Only the last stage computes losses; broadcast the metric names so every stage joins the reductions.
        holder = [names]
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(holder, src=last, group=parallel_state.get_pipeline_model_parallel_group())
        names = holder[0]
    if not names:
        return {}
    totals = torch.zeros(len(names), 2, dtype=torch.float64)
    for metrics in per_microbatch:
        for row, name in enumerate(names):
            totals[row] += metrics[name].detach().double().reshape(2).cpu()
    if torch.cuda.is_available():
        totals = totals.cuda()
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return {name: (totals[i, 0] / totals[i, 1]).item() if totals[i, 1] > 0 else 0.0 for i, name in enumerate(names)}


@dataclass(frozen=True)
class Filler:
    """A micro-batch that runs but adds nothing: `batch` goes forward (and backward), and its loss, denominator and
    metrics are multiplied by zero.

    Every data-parallel rank must make the same number of forward passes in a step: the MoE layers' token dispatch
    pairs the expert-parallel ranks up pass by pass, and a rank with no data must still join the gradient
    reduction. `_run_schedule` tops up a rank that has fewer micro-batches than another with fillers; a rank whose
    share of the batch is empty passes one filler built from any sample. A filler costs almost nothing: `of` shrinks
    a micro-batch to its batch type's `filler()` (a few text tokens that make the same loss function run).
    """

    batch: Any

    @staticmethod
    def of(batch: Any) -> Filler:
        """A filler shaped like `batch` (a micro-batch, or a filler)."""
        if isinstance(batch, Filler):
            return batch
        return Filler(batch.filler() if hasattr(batch, "filler") else batch)


def _real_count(microbatches: list[Any]) -> int:
    return sum(not isinstance(batch, Filler) for batch in microbatches)


def _equalized(microbatches: list[Any]) -> list[Any]:
    """`microbatches` followed by fillers up to the largest count on any data-parallel rank (a collective)."""
    if not microbatches:
        raise ValueError("no micro-batch on this rank: a rank with an empty share passes a Filler")
    count = torch.tensor([len(microbatches)], device="cuda" if torch.cuda.is_available() else "cpu")
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return microbatches + [Filler.of(microbatches[0])] * (int(count) - len(microbatches))


def _with_fillers(forward_step: ForwardStep) -> ForwardStep:
    """`forward_step` that runs a `Filler`'s batch with a zero loss (gradients of zero, nothing counted).

    Its metrics stay, as zeros, so that every rank joins the metric reduction with the same names."""

    def step(data_iterator: Iterator[Any], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        item = next(data_iterator)
        if not isinstance(item, Filler):
            return forward_step(iter([item]), model)
        output, loss_func = forward_step(iter([item.batch]), model)

        def zero_loss(output_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
            numerator, denominator, metrics = loss_func(output_tensor)
            return numerator * 0, denominator * 0, {name: value * 0 for name, value in metrics.items()}

        return output, zero_loss

    return step


def _run_schedule(
    models: list[torch.nn.Module], forward_step: ForwardStep, microbatches: list[Any], forward_only: bool
) -> tuple[list[Any], int]:
    """All micro-batches through Megatron's schedule (pipelined when PP > 1), with fillers so that every
    data-parallel rank runs as many as the busiest; returns every micro-batch's output, fillers' last.

    Packed micro-batches vary in length, so pipeline stages exchange shapes (`variable_seq_lengths`) and
    `seq_length`/`micro_batch_size` are unused. Also returns how many fillers this rank ran.

    Each distinct image is encoded once over all the micro-batches (`models.step_images`); the vision tower's
    backward for the summed gradients of its uses runs just before Megatron reduces the step's gradients."""
    microbatches = _equalized(microbatches)
    config = get_model_config(models[0])
    finalize = config.finalize_model_grads_func
    with step_images(models) as images:
        if finalize is not None:

            def encoder_backward_then_finalize(*args: Any, **kwargs: Any) -> Any:
                images.backward()
                return finalize(*args, **kwargs)

            config.finalize_model_grads_func = encoder_backward_then_finalize
        try:
            outputs = get_forward_backward_func()(
                forward_step_func=_with_fillers(forward_step),
                data_iterator=iter(microbatches) if len(models) == 1 else [iter(microbatches) for _ in models],
                model=models,
                num_microbatches=len(microbatches),
                seq_length=0,
                micro_batch_size=1,
                forward_only=forward_only,
            )
        finally:
            config.finalize_model_grads_func = finalize
        if not forward_only:
            images.backward()  # a no-op after the finalize hook above; needed where nothing finalizes
    return outputs, len(microbatches) - _real_count(microbatches)


def train_step(
    models: list[torch.nn.Module],
    optimizer: Any,
    scheduler: OptimizerParamScheduler,
    forward_step: ForwardStep,
    microbatches: list[Any],
) -> StepResult:
    """One optimizer step over `microbatches` (this rank's share of the global batch)."""
    for model in models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    per_microbatch, fillers = _run_schedule(models, forward_step, microbatches, forward_only=False)
    # Megatron's fp32/bf16 optimizers clip a NaN norm into NaN weights; check first and skip the update instead.
    found_inf = optimizer.prepare_grads()
    grad_norm = optimizer.get_grad_norm()
    skipped = bool(found_inf) or not math.isfinite(grad_norm)
    lr = optimizer.param_groups[0]["lr"]  # the rate this update uses (the scheduler then sets the next one)
    if not skipped:
        optimizer.step()
        scheduler.step(increment=1)
    return StepResult(_reduce_metrics(per_microbatch), float(grad_norm), lr, skipped, filler_microbatches=fillers)


def forward_only(models: list[torch.nn.Module], forward_step: ForwardStep, microbatches: list[Any]) -> list[Any]:
    """Run the schedule without gradients (scoring); returns the metrics dict of each micro-batch that is not a
    `Filler` (on the last pipeline stage; an empty list on the others)."""
    with torch.no_grad():
        return _run_schedule(models, forward_step, microbatches, forward_only=True)[0][: _real_count(microbatches)]


def forward_metrics(
    models: list[torch.nn.Module], forward_step: ForwardStep, microbatches: list[Any]
) -> dict[str, float]:
    """The metrics of a forward pass without gradients (a validation loss, a held-out accuracy), reduced as in
    `train_step`."""
    with torch.no_grad():
        return _reduce_metrics(_run_schedule(models, forward_step, microbatches, forward_only=True)[0])
