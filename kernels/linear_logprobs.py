"""Fused output layer + log-prob + entropy (PRISM_SPEC §4, §5, §8.9): from the final hidden states [T, H] and the
output weight [V, H], the log-prob of each target token and the entropy of each next-token distribution, forward and
backward, without ever materialising the [T, V] logits.

Reference: `prism_mcore.algorithms.linear_logprobs_and_entropy` (formulas and the vocab-parallel scheme are in
`prism_mcore.algorithms.logprobs`).

Forward: a grid over (token blocks, vocabulary splits). Each program computes [BLOCK_T, BLOCK_V] logit tiles with
`tl.dot` (fp32 accumulation) across its split of the vocabulary and folds them into running per-token statistics
(max, sum of exp, sum of exp-weighted logits, target logit), the online-softmax way; the tiles never leave registers.
The per-split statistics ([4, splits, T]) are merged in torch, then across tensor-parallel ranks by
`combine_vocab_shards` (one MAX and one SUM all-reduce).

Backward: with x = logits / tau, p = softmax(x), upstream gradients g_lp (log-prob) and g_H (entropy),

    dL/dz_tv = [g_lp_t (1[v = y_t] - p_tv) + g_H_t p_tv (E_p[x_t] - x_tv)] / tau

(d entropy/dx_v = p_v (E_p[x] - x_v)). A kernel recomputes each logit tile from the saved hidden states and weight,
turns it into dL/dz in registers and writes one vocabulary chunk [T, C] at a time; two cuBLAS matmuls per chunk
give dL/dhidden (+= g W_chunk, summed in fp32 across chunks) and dL/dW_chunk (= g^T hidden). C keeps that buffer
near 256 MiB. Under tensor parallelism the hidden-state gradient is summed over the group, as the hidden states were
replicated into it.

Tile sizes are tuned on a GPU: the first call for a problem size times each candidate of `GPU_TILE_SHAPES` (forward
and one backward chunk, on the real inputs) and keeps the fastest for that size (`_tiles`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from prism_kernels.runtime import Backend, dot_precision, interpreting, resolve_backend, upcast_dot_operands

from prism_mcore.algorithms.logprobs import combine_vocab_shards, is_vocab_parallel, linear_logprobs_and_entropy

BACKWARD_BUFFER_BYTES = 256 * 2**20


@dataclass(frozen=True)
class _Tiles:
    block_t: int
    block_v: int
    block_h: int
    num_warps: int
    target_programs: int  # the forward splits the vocabulary until about this many programs run


# The interpreter pays per program and per operation, not per element: few, minimum-size (16) tiles.
INTERPRETER_TILES = _Tiles(block_t=16, block_v=32, block_h=16, num_warps=1, target_programs=8)
# (BLOCK_T, BLOCK_V, BLOCK_H, warps) tried on a GPU; the first is the choice when results must be deterministic.
GPU_TILE_SHAPES = (
    (64, 128, 32, 8),
    (128, 128, 32, 8),
    (64, 256, 32, 8),
    (128, 64, 64, 4),
    (64, 64, 64, 4),
    (32, 128, 64, 4),
)
_TUNED_TILES: dict[tuple, _Tiles] = {}


def gpu_tile_candidates(device: torch.device) -> list[_Tiles]:
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return [_Tiles(t, v, h, warps, target_programs=4 * sm_count) for t, v, h, warps in GPU_TILE_SHAPES]


def fastest_tiles(candidates: list[_Tiles], milliseconds: Callable[[_Tiles], float]) -> _Tiles:
    """The candidate with the smallest time; ties go to the earlier one."""
    timings = [milliseconds(tiles) for tiles in candidates]
    return candidates[timings.index(min(timings))]


def _cuda_milliseconds(run: Callable[[], object], repeats: int = 3) -> float:
    run()  # compiles this tile configuration
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _tiles(hidden: torch.Tensor, weight: torch.Tensor, local_targets: torch.Tensor) -> _Tiles:
    """Tile sizes for this problem: tuned once per (device, token count rounded up to a power of two, vocabulary
    shard, hidden size, dtype) by timing each candidate's forward and one backward chunk on the real inputs. Tile
    sizes change the fp32 summation order, so under `torch.use_deterministic_algorithms` the first candidate is used
    without timing anything."""
    if interpreting():
        return INTERPRETER_TILES
    candidates = gpu_tile_candidates(hidden.device)
    if torch.are_deterministic_algorithms_enabled():
        return candidates[0]
    num_tokens, hidden_size = hidden.shape
    key = (hidden.device, triton.next_power_of_2(num_tokens), weight.shape[0], hidden_size, hidden.dtype)
    if key not in _TUNED_TILES:
        zeros = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
        width = min(weight.shape[0], BACKWARD_BUFFER_BYTES // max(1, num_tokens * weight.element_size()))
        scratch = torch.empty(num_tokens, width, dtype=weight.dtype, device=weight.device)

        def forward_and_one_backward_chunk(tiles: _Tiles) -> None:
            _forward_stats(hidden, weight, local_targets, 1.0, tiles)
            _grad_logits_chunk(
                hidden, weight[:width], local_targets, zeros, zeros, zeros, zeros, scratch, 0, 1.0, tiles
            )

        _TUNED_TILES[key] = fastest_tiles(
            candidates, lambda tiles: _cuda_milliseconds(lambda: forward_and_one_backward_chunk(tiles))
        )
    return _TUNED_TILES[key]


@triton.jit
def _scaled_logits_tile(
    hidden_ptr,
    weight_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    hidden_size,
    stride_hidden,
    stride_weight,
    inv_temperature,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(hidden[rows] @ weight[cols].T) / temperature as an fp32 [BLOCK_T, BLOCK_V] tile."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    row_offsets = rows.to(tl.int64)[:, None] * stride_hidden
    col_offsets = cols.to(tl.int64)[:, None] * stride_weight
    for h_start in range(0, hidden_size, BLOCK_H):
        h = h_start + tl.arange(0, BLOCK_H)
        h_mask = h < hidden_size
        hidden = tl.load(hidden_ptr + row_offsets + h[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        weight = tl.load(weight_ptr + col_offsets + h[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0)
        if UPCAST:
            hidden = hidden.to(tl.float32)
            weight = weight.to(tl.float32)
        acc = tl.dot(hidden, tl.trans(weight), acc, input_precision=PRECISION)
    return acc * inv_temperature


@triton.jit
def _vocab_stats_kernel(
    hidden_ptr,
    weight_ptr,
    targets_ptr,
    stats_ptr,
    num_tokens,
    vocab_size,
    hidden_size,
    stride_hidden,
    stride_weight,
    inv_temperature,
    vocab_per_split,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < num_tokens
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)

    running_max = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_T,), dtype=tl.float32)
    sum_exp_logit = tl.zeros((BLOCK_T,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_T,), dtype=tl.float32)
    split_start = split * vocab_per_split
    split_end = tl.minimum(split_start + vocab_per_split, vocab_size)
    for v_start in range(split_start, split_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < split_end
        x = _scaled_logits_tile(
            hidden_ptr,
            weight_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            hidden_size,
            stride_hidden,
            stride_weight,
            inv_temperature,
            BLOCK_T,
            BLOCK_V,
            BLOCK_H,
            UPCAST,
            PRECISION,
        )
        x_or_zero = tl.where(col_mask[None, :], x, 0.0)  # padding columns must not turn 0 * -inf into NaN
        new_max = tl.maximum(running_max, tl.max(tl.where(col_mask[None, :], x, float("-inf")), axis=1))
        rescale = tl.exp(running_max - new_max)
        exp_shifted = tl.where(col_mask[None, :], tl.exp(x - new_max[:, None]), 0.0)
        sum_exp = sum_exp * rescale + tl.sum(exp_shifted, axis=1)
        sum_exp_logit = sum_exp_logit * rescale + tl.sum(exp_shifted * x_or_zero, axis=1)
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], x_or_zero, 0.0), axis=1)
        running_max = new_max

    out = stats_ptr + split * num_tokens + rows
    stat_stride = num_splits * num_tokens
    tl.store(out, running_max, mask=row_mask)
    tl.store(out + stat_stride, sum_exp, mask=row_mask)
    tl.store(out + 2 * stat_stride, sum_exp_logit, mask=row_mask)
    tl.store(out + 3 * stat_stride, target_logit, mask=row_mask)


@triton.jit
def _grad_logits_kernel(
    hidden_ptr,
    weight_ptr,
    targets_ptr,
    lse_ptr,
    mean_logit_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    num_tokens,
    chunk_size,
    hidden_size,
    stride_hidden,
    stride_weight,
    stride_grad,
    chunk_start,
    inv_temperature,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < num_tokens
    col_mask = cols < chunk_size
    x = _scaled_logits_tile(
        hidden_ptr,
        weight_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        hidden_size,
        stride_hidden,
        stride_weight,
        inv_temperature,
        BLOCK_T,
        BLOCK_V,
        BLOCK_H,
        UPCAST,
        PRECISION,
    )
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    mean_logit = tl.load(mean_logit_ptr + rows, mask=row_mask, other=0.0)
    grad_logp = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0)
    grad_entropy = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)

    probs = tl.exp(x - lse[:, None])
    is_target = ((cols[None, :] + chunk_start) == targets[:, None]).to(tl.float32)
    grad = grad_logp[:, None] * (is_target - probs) + grad_entropy[:, None] * probs * (mean_logit[:, None] - x)
    grad = grad * inv_temperature
    out = grad_logits_ptr + rows.to(tl.int64)[:, None] * stride_grad + cols[None, :]
    tl.store(out, grad.to(grad_logits_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _kernel_options(dtype: torch.dtype, tiles: _Tiles) -> dict[str, object]:
    return dict(
        BLOCK_T=tiles.block_t,
        BLOCK_V=tiles.block_v,
        BLOCK_H=tiles.block_h,
        UPCAST=upcast_dot_operands(dtype),
        PRECISION=dot_precision(dtype),
        num_warps=tiles.num_warps,
    )


def _forward_stats(
    hidden: torch.Tensor, weight: torch.Tensor, local_targets: torch.Tensor, inv_temperature: float, tiles: _Tiles
) -> torch.Tensor:
    """Per-split [4, splits, T] statistics (max, sum exp, sum exp*logit, target logit) of this vocabulary shard."""
    num_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    token_blocks = triton.cdiv(num_tokens, tiles.block_t)
    vocab_blocks = triton.cdiv(vocab_size, tiles.block_v)
    wanted_splits = min(vocab_blocks, max(1, triton.cdiv(tiles.target_programs, token_blocks)))
    vocab_per_split = triton.cdiv(vocab_blocks, wanted_splits) * tiles.block_v
    num_splits = triton.cdiv(vocab_size, vocab_per_split)
    stats = torch.empty(4, num_splits, num_tokens, dtype=torch.float32, device=hidden.device)
    _vocab_stats_kernel[(token_blocks, num_splits)](
        hidden,
        weight,
        local_targets,
        stats,
        num_tokens,
        vocab_size,
        hidden_size,
        hidden.stride(0),
        weight.stride(0),
        inv_temperature,
        vocab_per_split,
        **_kernel_options(hidden.dtype, tiles),
    )
    return stats


def _grad_logits_chunk(
    hidden: torch.Tensor,
    weight_chunk: torch.Tensor,
    local_targets: torch.Tensor,
    lse: torch.Tensor,
    mean_logit: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_chunk: torch.Tensor,
    chunk_start: int,
    inv_temperature: float,
    tiles: _Tiles,
) -> None:
    """dL/dlogits of the vocabulary columns `chunk_start ..` covered by `weight_chunk`, written into `grad_chunk`."""
    num_tokens, width = grad_chunk.shape
    grid = (triton.cdiv(num_tokens, tiles.block_t), triton.cdiv(width, tiles.block_v))
    _grad_logits_kernel[grid](
        hidden,
        weight_chunk,
        local_targets,
        lse,
        mean_logit,
        grad_logp,
        grad_entropy,
        grad_chunk,
        num_tokens,
        width,
        hidden.shape[1],
        hidden.stride(0),
        weight_chunk.stride(0),
        grad_chunk.stride(0),
        chunk_start,
        inv_temperature,
        **_kernel_options(hidden.dtype, tiles),
    )


class _LinearLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        vocab_start: int,
        group: dist.ProcessGroup | None,
        backward_chunk: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, weight = hidden.contiguous(), weight.contiguous()
        local_targets = (targets - vocab_start).contiguous()
        tiles = _tiles(hidden, weight, local_targets)
        stats = _forward_stats(hidden, weight, local_targets, 1.0 / temperature, tiles)
        shard_max = stats[0].amax(dim=0)
        rescale = torch.exp(stats[0] - shard_max)
        lse, mean_logit, target_logit = combine_vocab_shards(
            shard_max, (stats[1] * rescale).sum(0), (stats[2] * rescale).sum(0), stats[3].sum(0), group
        )
        ctx.save_for_backward(hidden, weight, local_targets, lse, mean_logit)
        ctx.inv_temperature = 1.0 / temperature
        ctx.group = group
        ctx.backward_chunk = backward_chunk
        ctx.tiles = tiles
        return target_logit - lse, lse - mean_logit

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, local_targets, lse, mean_logit = ctx.saved_tensors
        tiles: _Tiles = ctx.tiles
        num_tokens, hidden_size = hidden.shape
        vocab_size = weight.shape[0]
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy.float().contiguous()
        wants_hidden, wants_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        chunk = ctx.backward_chunk or BACKWARD_BUFFER_BYTES // max(1, num_tokens * weight.element_size())
        chunk = min(max(tiles.block_v, chunk // tiles.block_v * tiles.block_v), vocab_size)
        grad_logits = torch.empty(num_tokens, chunk, dtype=weight.dtype, device=weight.device)
        grad_hidden = (
            torch.zeros(num_tokens, hidden_size, dtype=torch.float32, device=hidden.device) if wants_hidden else None
        )
        grad_weight = torch.empty_like(weight) if wants_weight else None
        for chunk_start in range(0, vocab_size, chunk):
            width = min(chunk, vocab_size - chunk_start)
            weight_chunk = weight[chunk_start : chunk_start + width]
            grad_chunk = grad_logits[:, :width]
            _grad_logits_chunk(
                hidden,
                weight_chunk,
                local_targets,
                lse,
                mean_logit,
                grad_logp,
                grad_entropy,
                grad_chunk,
                chunk_start,
                ctx.inv_temperature,
                tiles,
            )
            if wants_hidden:
                _add_product_fp32(grad_hidden, grad_chunk, weight_chunk)
            if wants_weight:
                torch.matmul(grad_chunk.T, hidden, out=grad_weight[chunk_start : chunk_start + width])
        if wants_hidden:
            if is_vocab_parallel(ctx.group):
                dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _add_product_fp32(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`total += a @ b` for an fp32 `total`, without rounding a bf16/fp16 product to its dtype first: the hidden
    gradient sums one product per vocabulary chunk, and rounding each to bf16 would lose ~3 digits per chunk.
    cuBLAS writes the low-precision product straight into the fp32 sum; elsewhere the operands are upcast."""
    if a.dtype == torch.float32:
        total.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:
        total.addmm_(a.float(), b.float())


def fused_linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    group: dist.ProcessGroup | None = None,
    backend: Backend | str | None = None,
    backward_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (log-prob of each target, entropy) per token for `logits = hidden @ weight.T`.

    `hidden` [T, H] (replicated over `group`), `weight` [V_shard, H] holding vocabulary ids
    `vocab_start .. vocab_start + V_shard - 1`, `targets` [T] full-vocabulary ids. `backward_chunk` overrides the
    vocabulary chunk of the backward (default: the [T, chunk] gradient buffer stays under 256 MiB).
    """
    if (
        hidden.dim() != 2
        or weight.dim() != 2
        or hidden.shape[1] != weight.shape[1]
        or targets.shape != hidden.shape[:1]
    ):
        raise ValueError(
            f"expected hidden [T, H], weight [V, H], targets [T]; got {tuple(hidden.shape)}, {tuple(weight.shape)}, "
            f"{tuple(targets.shape)}"
        )
    if resolve_backend(backend, hidden.device) is Backend.TORCH:
        return linear_logprobs_and_entropy(
            hidden, weight, targets, temperature=temperature, vocab_start=vocab_start, group=group
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    return _LinearLogprobsEntropy.apply(hidden, weight, targets, temperature, vocab_start, group, backward_chunk)
