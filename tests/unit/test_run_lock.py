"""One job per run folder: a second job on a folder in use stops with one line naming the first."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from prism_mcore.training.run_lock import RunFolderInUse, lock_run_dir


def lock_holder(run_dir: Path) -> subprocess.Popen:
    """Another process that takes `run_dir`'s lock, prints `locked` and holds it for two minutes."""
    return subprocess.Popen(
        [sys.executable, "-c", f"from prism_mcore.training.run_lock import lock_run_dir as l; l({str(run_dir)!r}); "
         "print('locked', flush=True); import time; time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_a_second_job_on_a_run_folder_is_refused_until_the_first_ends(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = lock_holder(run_dir)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderInUse, match=rf"in use by a running job \(pid {holder.pid} on "):
            lock_run_dir(run_dir)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while True:  # the lock went with the killed process
        try:
            lock_run_dir(run_dir)
            break
        except RunFolderInUse:
            assert time.time() < deadline
            time.sleep(0.1)
    lock_run_dir(run_dir)  # taking it again in the same process is a no-op
    assert (run_dir / ".lock").read_text().startswith("pid ")
