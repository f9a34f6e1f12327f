"""A run killed with SIGKILL leaves no process behind: `python -m prism_mcore sft` on the embedded default, killed
right after its first step checkpoint (when Megatron's checkpoint writer has done its work), has no descendant
alive ten seconds later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def test_a_killed_sft_run_leaves_no_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "prism_mcore", "sft", f"run.output_dir={run_dir}", "sft.max_steps=50",
        "sft.save_every=1", "sft.global_batch_size=4", "sft.eval_every=0", "data.max_eval_prompts=4",
    ]  # fmt: skip
    log = tmp_path / "sft.log"
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "2"})  # fmt: skip
    checkpoints = run_dir / "checkpoints" / "sft"
    deadline = time.time() + 600
    while process.poll() is None and time.time() < deadline and not list(checkpoints.glob("step_*")):
        time.sleep(0.2)
    assert process.poll() is None, log.read_text()[-4000:]
    descendants = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 10
    alive = descendants
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    survivors = [" ".join(p.cmdline())[:200] for p in alive]
    for orphan in alive:
        orphan.kill()
    assert survivors == []
