"""From the repository root `kernels/` is also importable as `kernels`, the Hugging Face library's name: transformers'
probe for that library must answer "not available" instead of raising."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_transformers_kernels_probe_says_not_available() -> None:
    script = "from transformers.utils.import_utils import is_kernels_available as f; print(f())"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
