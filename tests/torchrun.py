"""Run a worker script under `torchrun` (gloo on CPU) and collect what each rank reports.

Distributed tests compare a parallel layout (TP/PP/EP/DP) with the single-process run of the same worker. A worker
writes one JSON file per rank into the folder given as `--out`; `run_torchrun` returns those dicts by rank.
The workers see no GPU, so they run on gloo and CPU on any machine (with CUDA visible, two ranks on a one-GPU machine
would pick NCCL and fail to set device 1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(
    script: str | Path, nproc: int, out_dir: Path, args: list[str] = (), timeout: float = 600
) -> list[dict]:
    """Launch `script` on `nproc` local CPU ranks; fail with the ranks' output if any rank fails."""
    out_dir.mkdir(parents=True, exist_ok=True)
    repo = str(Path(__file__).resolve().parent.parent)  # workers import `tests.torchrun` and the package
    pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": pythonpath,
        "CUDA_VISIBLE_DEVICES": "",  # gloo/CPU tests; see the module docstring
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(script), "--out", str(out_dir), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {Path(script).name} {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def write_rank_result(out_dir: str | Path, result: dict) -> None:
    """Called by a worker: store this rank's result for `run_torchrun`."""
    rank = int(os.environ.get("RANK", 0))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
