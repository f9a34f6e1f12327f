"""One job per run folder: rank 0 holds an exclusive lock on `<run_dir>/.lock` while the job runs.

Two jobs on one folder would race each other for its step checkpoints, stage markers and metrics (for example a
restarted command while the killed one's workers are still alive). No Megatron import here: the CLI reports the
refusal in one line.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Any


class RunFolderInUse(RuntimeError):
    """Another live process holds the run folder's lock."""


_RUN_LOCKS: dict[Path, Any] = {}  # run folder -> the open lock file this process holds


def lock_run_dir(run_dir: str | Path) -> None:
    """Hold an exclusive lock on `<run_dir>/.lock` for the rest of this process (rank 0 calls it): a second run
    started on the same folder stops at once, naming the first, instead of racing it for checkpoints and markers.
    The lock goes with the process, however it ends."""
    path = Path(run_dir).resolve() / ".lock"
    if path in _RUN_LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115  held open until the process exits
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderInUse(
            f"{run_dir} is in use by a running job ({holder}): stop it, or choose another run.output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _RUN_LOCKS[path] = handle


def check_run_dir_free(run_dir: str | Path) -> None:
    """Raise `RunFolderInUse` if a live process holds `<run_dir>/.lock` now (what a launcher checks before it starts
    workers); takes nothing: the lock is tested and let go at once."""
    path = Path(run_dir).resolve() / ".lock"
    if path in _RUN_LOCKS or not path.exists():
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "another process"
            raise RunFolderInUse(
                f"{run_dir} is in use by a running job ({holder}): stop it, or choose another run.output_dir"
            ) from None
