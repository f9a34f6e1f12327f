"""No silent success: a stage with no usable rows, or whose updates are mostly skipped, stops with one line and
no `.done`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from prism_mcore.config import apply_overrides, load_recipe
from prism_mcore.data import errors
from prism_mcore.data.errors import DataError
from prism_mcore.data.readers import open_sft
from prism_mcore.data.samples import SampleBuilder
from prism_mcore.stages.sft import require_usable_row
from prism_mcore.training.errors import StageFailed
from prism_mcore.training.loop import run_steps
from prism_mcore.training.metrics import MetricsLogger, read_metrics

REPO = Path(__file__).parents[3]


def context(tmp_path: Path, *overrides: str) -> SimpleNamespace:
    """What `run_steps` reads of a run context."""
    return SimpleNamespace(
        config=apply_overrides(load_recipe("embedded"), list(overrides)),
        metrics=MetricsLogger(tmp_path, tensorboard=False),
        run_path=lambda folder, name: tmp_path / folder / name,
    )


@pytest.mark.parametrize("key", ["skipped", "actor/skipped", "critic/skipped"])
def test_a_stage_stops_once_too_many_updates_are_skipped(tmp_path: Path, key: str) -> None:
    ctx = context(tmp_path, "run.max_skipped_step_fraction=0.1")
    steps_run = []

    def step_fn(step: int) -> dict[str, float]:
        steps_run.append(step)
        return {"loss": 1.0, key: float(step >= 1)}  # every update after the first is skipped

    # 20 steps allow 2 skipped ones; the third (step index 3) stops the stage before it saves anything.
    with pytest.raises(StageFailed) as raised:
        run_steps(ctx, "align", {}, total_steps=20, save_every=0, step_fn=step_fn)
    assert steps_run == [0, 1, 2, 3]
    assert str(raised.value).startswith(
        "align: 3 of the first 4 steps skipped their update (non-finite gradient or no usable data), over "
        "run.max_skipped_step_fraction=0.1 of 20 steps"
    )
    assert [record["step"] for record in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (tmp_path / "checkpoints" / "align").exists()


class Stop(Exception):
    """Ends a test's step loop before its last step (which would save a checkpoint)."""


def test_skipped_updates_within_the_share_are_allowed(tmp_path: Path) -> None:
    ctx = context(tmp_path, "run.max_skipped_step_fraction=0.5")  # 6 steps: 3 skipped ones allowed

    def step_fn(step: int) -> dict[str, float]:
        if step == 4:
            raise Stop
        return {"skipped": float(step != 1)}

    with pytest.raises(Stop):  # steps 0, 2, 3 skipped: within the share
        run_steps(ctx, "sft", {}, 6, 0, step_fn)


@pytest.mark.parametrize(
    ("content", "summary"),
    [
        ("\n\n   \n", "read 0, kept 0, truncated 0, skipped 0"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n' * 3, "read 3, kept 0, truncated 0, skipped 3 "
         "(invalid_value: 3)"),
    ],
)  # fmt: skip
def test_sft_data_without_a_usable_row_is_one_error(
    tmp_path: Path, builder: SampleBuilder, content: str, summary: str
) -> None:
    path = tmp_path / "sft.jsonl"
    path.write_text(content)
    reader = open_sft(path)
    with pytest.raises(DataError) as raised:
        require_usable_row(reader, list(range(len(reader))), builder, "skip")
    assert (raised.value.reason, raised.value.file) == (errors.NO_USABLE_ROWS, str(path))
    assert raised.value.message == f"no usable conversation to train on ({summary})"


def test_sft_on_blank_lines_stops_with_one_line_and_no_done(tmp_path: Path) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text("\n\n  \n")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "prism_mcore", "sft", f"data.sft_path={data}", f"run.output_dir={run_dir}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {data}: no usable conversation to train on (read 0, kept 0, truncated 0, skipped 0) [no_usable_rows]"
    ]
    assert not (run_dir / "stages" / "sft.done").exists() and not (run_dir / "hf").exists()
    assert json.loads((run_dir / "config.json").read_text())["data"]["sft_path"] == str(data)
