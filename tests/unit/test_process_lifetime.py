"""Helper processes end with the process that started them, however it ends: a torchrun-style worker with its
launcher, and a math-verify helper (asked for by a thread that has since finished) with its process, even while
the helper is busy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def _gone_within(pid: int, seconds: float) -> bool:
    """True once `pid` is gone or a zombie nobody has reaped yet; kills it (and says False) after `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return False


def test_a_worker_dies_with_its_launcher(tmp_path: Path) -> None:
    """A launcher killed with SIGKILL takes its worker along (torchrun's workers run in their own session)."""
    worker = (
        "import os, time; from prism_mcore.runtime.lifetime import exit_with_parent; exit_with_parent(); "
        f"open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}], "
         "start_new_session=True); time.sleep(120)"]
    )  # fmt: skip
    pid_file = tmp_path / "pid"
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert _gone_within(pid, 10), "the worker outlived its launcher"


# A process whose reward threads used math-verify: the first thread's helper is reused after that thread ended, then
# a thread gives it a long job; the process reports the helper's pid and is killed in the middle of that job.
_REWARD_PROCESS = """
import os, threading, time
from prism_mcore.rewards import math_verify_runner as runner

results = []
first = threading.Thread(target=lambda: results.append(runner.math_equivalent(["1/2"], ["0.5"])))
first.start(); first.join()
reuse = threading.Thread(target=lambda: results.append(runner._call_in_helper(os.getpid, (), 300)))
reuse.start(); reuse.join()
threading.Thread(target=runner._call_in_helper, args=(time.sleep, (300,), 600), daemon=True).start()
print(results[0], results[1], flush=True)
time.sleep(600)
"""


def test_a_busy_math_verify_helper_dies_with_its_process() -> None:
    process = subprocess.Popen([sys.executable, "-c", _REWARD_PROCESS], stdout=subprocess.PIPE, text=True)
    try:
        equivalent, helper_pid = process.stdout.readline().split()
        assert equivalent == "True"
        helper = psutil.Process(int(helper_pid))
        assert helper.ppid() == process.pid  # the first thread's helper survived that thread and was reused
        deadline = time.time() + 60
        while helper.status() != psutil.STATUS_SLEEPING and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # inside time.sleep(300) by now
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
    assert _gone_within(helper.pid, 5), "the math-verify helper outlived its process"
