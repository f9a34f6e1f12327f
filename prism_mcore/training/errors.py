"""Why a stage stops without finishing: the run cannot give a meaningful result, so it must not write `.done`.

No Megatron import here: the command line reports these in one line (exit code 2), like config and data errors.
"""

from __future__ import annotations


class StageFailed(RuntimeError):
    """A stage stopped for a reason the user must act on (e.g. most of its updates were skipped as non-finite)."""
