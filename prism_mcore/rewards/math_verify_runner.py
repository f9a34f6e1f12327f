"""Time-limited math-verify equivalence that is safe to call from any thread (PRISM_SPEC §6.2 step 3, §6.3).

math-verify bounds every `parse` and every comparison in `verify` with `signal.alarm`, which Python allows only on the
main thread: from any other thread both functions raise ValueError when given a timeout, and without one nothing
stops a hard comparison (`(x+1)^{3000}` against `(x+2)^{3000}` outlasts a 3 s limit). So `math_equivalent`
- on the main thread runs math-verify right here, under its own alarms;
- on any other thread sends the same work to a helper process, whose main thread runs it under the same alarms.
  Helpers start on first use (about a second: a fresh interpreter imports this package) and are reused by later calls
  from any thread, one per concurrent caller, so a thread pool gets as many processes working in parallel. A helper
  that answers later than the alarms allow is stuck where no signal can interrupt it (inside one long C call): it is
  killed and the answer counts as not equivalent.

A parse or comparison that times out counts as not equivalent (accuracy 0), as in the reference. Model output is
never executed: math-verify reads LaTeX with its own grammar, and hands sympy's `parse_expr` only strings made of
digits, whitespace and arithmetic operators.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.parser import ExtractionTarget

from prism_mcore.runtime.lifetime import exit_with_parent, start_helper

logger = logging.getLogger(__name__)

MATH_VERIFY_TIMEOUT_S = 5  # math-verify's own default for each parse and each comparison
DEFAULT_TARGETS: tuple[ExtractionTarget, ...] = (LatexExtractionConfig(), ExprExtractionConfig())  # `parse`'s default

# A parse yields at most two items (the expression and its string), so one `verify` makes up to four comparisons.
_COMPARISONS_PER_VERIFY = 4
_HELPER_SLACK_S = 10.0  # pipe transfer and scheduling on a loaded machine
_HELPER_START_TIMEOUT_S = 300.0  # a new helper imports torch (via prism_mcore.record) and sympy before it answers


# accept(text, extracted, is_gold): whether a parse that read `extracted` out of `text` counts
ExtractionCheck = Callable[[str, str, bool], bool]


def _parsed(
    text: str, targets: Sequence[ExtractionTarget], timeout_s: int, accept: ExtractionCheck | None, is_gold: bool
) -> list:
    result = parse(text, targets, parsing_timeout=timeout_s)
    # A parse is [expression, the string it was read from] (or empty when nothing was found).
    if result and accept is not None and not accept(text, str(result[-1]), is_gold):
        return []
    return result


def _equivalent_here(
    golds: Sequence[str],
    predictions: Sequence[str],
    gold_targets: Sequence[ExtractionTarget],
    prediction_targets: Sequence[ExtractionTarget],
    timeout_s: int,
    accept: ExtractionCheck | None = None,
) -> bool:
    """`math_equivalent`'s work, on the calling thread, which must be its process's main thread."""
    parsed_golds = [_parsed(gold, gold_targets, timeout_s, accept, True) for gold in golds]
    parsed_predictions = [_parsed(pred, prediction_targets, timeout_s, accept, False) for pred in predictions]
    return any(
        verify(gold, pred, timeout_seconds=timeout_s)
        for gold in parsed_golds
        if gold
        for pred in parsed_predictions
        if pred
    )


def _serve() -> None:
    """A helper process's main loop: unpickle `(function, args)` from stdin, pickle `(succeeded, result)` to stdout.

    Ends when the parent closes the pipe, and with the parent however it ends, even in the middle of a job."""
    exit_with_parent()
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr, not into the replies
    requests = sys.stdin.buffer
    pickle.dump("ready", replies)
    replies.flush()
    while True:
        try:
            function, args = pickle.load(requests)
        except EOFError:  # the parent closed the pipe or exited
            return
        try:
            reply = (True, function(*args))
        except Exception as error:
            reply = (False, error)
        pickle.dump(reply, replies)
        replies.flush()


class _Helper:
    """One helper process, talking pickles over its stdin and stdout.

    A fresh interpreter (`python -c`), not a multiprocessing child: "spawn" re-runs the parent's main script, which
    breaks scripts without a `__main__` guard, and "fork" can deadlock in a process that has threads (torch, gloo).
    """

    def __init__(self) -> None:
        # The child imports prism_mcore from wherever the parent did.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        self._process = start_helper(
            [sys.executable, "-c", "from prism_mcore.rewards.math_verify_runner import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            self._receive(_HELPER_START_TIMEOUT_S)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"math-verify helper did not start within {_HELPER_START_TIMEOUT_S:.0f} s") from None

    def _receive(self, timeout_s: float) -> Any:
        ready, _, _ = select.select([self._process.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError
        try:
            return pickle.load(self._process.stdout)
        except EOFError:
            raise RuntimeError("math-verify helper exited; its stderr says why") from None

    def call(self, function: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Any:
        """`function(*args)` in the helper; TimeoutError if no answer within `timeout_s`."""
        pickle.dump((function, args), self._process.stdin)
        self._process.stdin.flush()
        succeeded, result = self._receive(timeout_s)
        if not succeeded:
            raise result
        return result

    def close(self) -> None:
        """End an idle helper: closing its stdin ends its loop."""
        self._process.stdin.close()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        self._process.stdout.close()

    def kill(self) -> None:
        self._process.kill()
        self._process.wait()
        self._process.stdin.close()
        self._process.stdout.close()


_idle_helpers: list[_Helper] = []
_idle_helpers_lock = threading.Lock()
# A forked child must not talk through its parent's pipes.
os.register_at_fork(after_in_child=_idle_helpers.clear)


@atexit.register
def _close_idle_helpers() -> None:
    with _idle_helpers_lock:
        helpers = _idle_helpers[:]
        _idle_helpers.clear()
    for helper in helpers:
        helper.close()


def _call_in_helper(function: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Any:
    with _idle_helpers_lock:
        helper = _idle_helpers.pop() if _idle_helpers else None
    if helper is None:
        helper = _Helper()
    try:
        result = helper.call(function, args, timeout_s)
    except BaseException:
        helper.kill()  # stuck or broken: never hand it to another caller
        raise
    with _idle_helpers_lock:
        _idle_helpers.append(helper)
    return result


def math_equivalent(
    golds: Sequence[str],
    predictions: Sequence[str],
    *,
    gold_targets: Sequence[ExtractionTarget] = DEFAULT_TARGETS,
    prediction_targets: Sequence[ExtractionTarget] = DEFAULT_TARGETS,
    timeout_s: int = MATH_VERIFY_TIMEOUT_S,
    accept: ExtractionCheck | None = None,
) -> bool:
    """True if math-verify finds some gold equivalent to some prediction.

    Each string is parsed with math-verify's `parse` and the given extraction targets, and each (gold, prediction)
    pair is compared with `verify` (its defaults: 6-digit float rounding, strict). With `accept` (a module-level
    function, so a helper process can receive it), a parse counts only if `accept(text, extracted, is_gold)`. Every
    parse and every comparison is limited to `timeout_s` seconds, on any thread (see the module docstring).
    """
    args = (tuple(golds), tuple(predictions), tuple(gold_targets), tuple(prediction_targets), timeout_s, accept)
    if threading.current_thread() is threading.main_thread():
        return _equivalent_here(*args)
    calls = len(golds) + len(predictions) + _COMPARISONS_PER_VERIFY * len(golds) * len(predictions)
    try:
        return _call_in_helper(_equivalent_here, args, timeout_s * calls + _HELPER_SLACK_S)
    except TimeoutError:
        logger.warning(
            "math-verify helper stuck on golds=%r predictions=%r: killed, counted as not equal", golds, predictions
        )
        return False
