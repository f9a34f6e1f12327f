"""tools/bench_kernels.py runs on CPU at tiny sizes and appends well-formed rows (with versions) to the file it is
given; BENCHMARKS.md's kernel table has the tool's header, so rows land in it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_kernels.py"


def _load_tool(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", TOOL)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_appends_one_row_per_kernel(tmp_path, monkeypatch):
    bench = _load_tool(monkeypatch)
    out = tmp_path / "BENCHMARKS.md"
    argv = ["--tiny", "--repeats", "1", "--out", str(out)]
    bench.main(argv)
    bench.main(argv)

    text = out.read_text()
    assert text.count(bench.TABLE_HEADER) == 1
    rows = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(rows) == 6
    expected_device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)"
    versions = f"torch {torch.__version__}, triton {importlib.metadata.version('triton')}"
    for row, kernel in zip(rows, ["linear_logprobs", "alignment_advantage", "discriminator_loss"] * 2, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 13
        assert cells[1] == expected_device and cells[2] == kernel
        assert float(cells[5]) > 0 and float(cells[6]) > 0
        assert (float(cells[8]) > 0) if kernel == "linear_logprobs" else cells[8] == "n/a"  # the 3-GEMM floor
        assert cells[11] == versions
        assert cells[12] == "`python tools/bench_kernels.py --tiny --repeats 1 --out " + str(out) + "`"


def test_benchmarks_md_kernel_table_has_the_tools_header(monkeypatch):
    assert _load_tool(monkeypatch).TABLE_HEADER in (REPO / "BENCHMARKS.md").read_text()
