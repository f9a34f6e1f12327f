"""Benchmark each Triton kernel of `prism_kernels` against its torch reference and append the results to
BENCHMARKS.md (median time over repeats, peak extra memory, speed-up).

On a GPU it runs the realistic sizes (fused log-probs: 8,192 tokens x vocab 151,936 x hidden 2,560 in bf16, forward
and backward; alignment advantage: 512 groups x 16; discriminator loss: a 64-sample micro-batch, forward and
backward), timed with CUDA events, peak memory from the CUDA allocator. The fused log-prob kernel is also set against
its floor: the three cuBLAS matmuls of the same shapes alone (logits, hidden gradient, weight gradient), which any
implementation of the computation has to do; the kernel's time over the floor is what the fusion costs or saves. Without a GPU it runs tiny sizes, timed by
the wall clock with the kernels in Triton's interpreter: those rows are labelled `cpu (interpreter)` and only show
that the tool works, not how fast anything is.

    python tools/bench_kernels.py                  # appends to ./BENCHMARKS.md
    python tools/bench_kernels.py --tiny --out /tmp/bench.md --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from prism_kernels.alignment_advantage import fused_alignment_advantage
from prism_kernels.discriminator_loss import fused_discriminator_loss
from prism_kernels.linear_logprobs import fused_linear_logprobs_and_entropy

TABLE_HEADER = (
    "| date | device | kernel | shape | dtype | triton ms | torch ms | speed-up | 3-GEMM floor ms | triton peak MiB "
    "| torch peak MiB | versions | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


@dataclass(frozen=True)
class Sizes:
    tokens: int
    vocab: int
    hidden: int
    groups: int
    group_size: int
    disc_batch: int


REALISTIC = Sizes(tokens=8192, vocab=151_936, hidden=2560, groups=512, group_size=16, disc_batch=64)
TINY = Sizes(tokens=32, vocab=256, hidden=32, groups=8, group_size=4, disc_batch=8)


@dataclass
class Case:
    kernel: str
    shape: str
    dtype: str
    run: Callable[[str], object]  # runs the computation once with the given backend ("triton" or "torch")
    floor: Callable[[], object] | None = None  # the same matmuls alone: no implementation can beat it


def logprob_case(sizes: Sizes, device: torch.device) -> Case:
    dtype = torch.bfloat16
    hidden = torch.randn(sizes.tokens, sizes.hidden, device=device, dtype=dtype)
    weight = (torch.randn(sizes.vocab, sizes.hidden, device=device) / sizes.hidden**0.5).to(dtype)
    targets = torch.randint(0, sizes.vocab, (sizes.tokens,), device=device)

    def run(backend: str) -> None:
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        logp, entropy = fused_linear_logprobs_and_entropy(h, w, targets, backend=backend)
        (logp.sum() + entropy.sum()).backward()

    def three_gemms() -> None:
        # The matmuls any implementation must do: logits = h W^T, dL/dh = g W, dL/dW = g^T h (g: a [T, V] gradient).
        logits = hidden @ weight.T
        logits @ weight
        logits.T @ hidden

    shape = f"T={sizes.tokens} V={sizes.vocab} H={sizes.hidden} fwd+bwd"
    return Case("linear_logprobs", shape, "bf16", run, floor=three_gemms)


def advantage_case(sizes: Sizes, device: torch.device) -> Case:
    count = sizes.groups * sizes.group_size
    inputs = dict(
        caption_scores=torch.randn(count, device=device),
        cot_scores=torch.randn(count, device=device),
        format_valid=torch.rand(count, device=device) > 0.2,
        group_ids=torch.arange(sizes.groups, device=device).repeat_interleave(sizes.group_size),
    )
    return Case(
        "alignment_advantage",
        f"{sizes.groups} groups x {sizes.group_size}",
        "fp32",
        lambda backend: fused_alignment_advantage(**inputs, backend=backend),
    )


def discriminator_case(sizes: Sizes, device: torch.device) -> Case:
    scores = [3 * torch.randn(sizes.disc_batch, device=device) for _ in range(4)]
    valid = torch.rand(sizes.disc_batch, device=device) > 0.2

    def run(backend: str) -> None:
        leaves = [s.detach().requires_grad_() for s in scores]
        fused_discriminator_loss(*leaves, valid, backend=backend).loss.backward()

    return Case("discriminator_loss", f"B={sizes.disc_batch} fwd+bwd", "fp32", run)


def measure(run: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float | None]:
    """(median milliseconds, peak memory above the starting allocation in MiB, or None on CPU)."""
    run()  # warm-up: compiles the Triton kernels, fills the allocator cache
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - baseline) / 2**20


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"


def benchmark_rows(sizes: Sizes, repeats: int, device: torch.device, command: str) -> list[str]:
    date = datetime.date.today().isoformat()
    versions = f"torch {torch.__version__}, triton {importlib.metadata.version('triton')}"
    rows = []
    for make_case in (logprob_case, advantage_case, discriminator_case):
        torch.manual_seed(0)
        case = make_case(sizes, device)
        triton_ms, triton_mib = measure(lambda case=case: case.run("triton"), repeats, device)
        torch_ms, torch_mib = measure(lambda case=case: case.run("torch"), repeats, device)
        floor = "n/a" if case.floor is None else f"{measure(case.floor, repeats, device)[0]:.3f}"
        mib = ["n/a" if value is None else f"{value:.0f}" for value in (triton_mib, torch_mib)]
        rows.append(
            f"| {date} | {device_label(device)} | {case.kernel} | {case.shape} | {case.dtype} | {triton_ms:.3f} "
            f"| {torch_ms:.3f} | {torch_ms / triton_ms:.2f}x | {floor} | {mib[0]} | {mib[1]} | {versions} "
            f"| `{command}` |"
        )
        print(rows[-1], flush=True)
    return rows


def append_rows(path: Path, rows: list[str]) -> None:
    """Append rows to the benchmark table in `path`, creating the file and its header when missing."""
    existing = path.read_text() if path.exists() else ""
    with path.open("a") as out:
        if TABLE_HEADER not in existing:
            title = "" if existing else "# Kernel benchmarks\n\nWritten by `tools/bench_kernels.py`.\n"
            out.write(f"{title}\n{TABLE_HEADER}")
        out.write("\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="markdown file to append rows to")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes even on a GPU (always on CPU)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per measurement")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = TINY if args.tiny or device.type != "cuda" else REALISTIC
    command = " ".join(["python tools/bench_kernels.py", *(sys.argv[1:] if argv is None else argv)])
    rows = benchmark_rows(sizes, args.repeats, device, command)
    append_rows(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
