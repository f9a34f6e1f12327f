"""The metrics log of a run: appended per step, cut back on resume, and readable after a run killed mid-write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prism_mcore.training.metrics import MetricsLogger, read_metrics


def test_resume_cuts_the_log_back_and_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.log("align", step, {"loss": 1.0 / step, "bad": float("nan")})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"stage": "align", "step": 4, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    logger.truncate("align", 2)  # resumed from the step-2 checkpoint
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"], r["bad"]) for r in records] == [(1, 1.0, None), (2, 0.5, None)]
    logger.close()


def test_a_bad_line_inside_the_log_is_named(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"stage": "sft", "step": 1}) + "\nnot json\n" + json.dumps({"stage": "sft"}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        read_metrics(path)
