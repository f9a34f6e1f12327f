"""Process lifetime: every helper process the project starts ends when the process that started it ends, however that
one ends (SIGKILL included, where no cleanup code of the parent runs).

The mechanism is Linux's `PR_SET_PDEATHSIG` (`exit_with_parent`): the kernel kills the calling process when its parent
ends, even while it is stuck in a C call. The kernel's "parent" is the thread that started the process, so
`start_helper` starts helpers from one long-lived thread: a helper asked for by a short-lived thread (math-verify
helpers, asked for by reward threads) then lives as long as the process, not as long as that thread. torchrun's
workers call `exit_with_parent` too: torchrun starts them in sessions of their own, so a launcher killed with SIGKILL
(or the shell script around it) would leave them training on, racing a restarted command for the run folder.

The helpers our libraries would start are avoided at the source: checkpoint saves keep Megatron's write-results queue
in-process (`training.checkpoint.dist_save`) instead of starting a `multiprocessing.Manager` server for it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_PARENT_PID = "PRISM_MCORE_PARENT_PID"  # set by `start_helper`: the process a helper must not outlive
_starter: ThreadPoolExecutor | None = None


def exit_with_parent() -> None:
    """Make the kernel SIGKILL this process when the thread that started it ends (Linux; a no-op elsewhere).

    Called first thing in a helper; a helper from `start_helper` whose parent ended before that also exits here."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    parent = os.environ.pop(_PARENT_PID, None)
    if parent is not None and os.getppid() != int(parent):
        os._exit(1)  # the parent ended before the signal was armed


def start_helper(args: list[str], **popen_kwargs: Any) -> subprocess.Popen:
    """`subprocess.Popen(args, ...)` started from this process's helper-starting thread, for a helper that calls
    `exit_with_parent()`: it then dies with this process, not with the thread that called `start_helper`."""
    global _starter
    if _starter is None:
        _starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="helper-starter")
    env = {**popen_kwargs.pop("env", os.environ), _PARENT_PID: str(os.getpid())}
    return _starter.submit(subprocess.Popen, args, env=env, **popen_kwargs).result()


def _forget_starter() -> None:
    global _starter
    _starter = None  # its thread did not survive the fork


os.register_at_fork(after_in_child=_forget_starter)
