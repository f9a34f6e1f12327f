"""What a finished run shows a person: the table of accuracy and format-valid rate per stage, the training-curve
plot, and a side-by-side comparison of two runs (SFT -> RLVR against SFT -> PRISM -> RLVR).

Everything is read from the run folder (`summary.json`, `metrics.jsonl`), so `python -m prism_mcore report DIR`
works on any finished or interrupted run: a stage that has logged steps but not finished gets a row saying how far
it got, and a run with no finished stage shows just those rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prism_mcore.config.schema import STAGES
from prism_mcore.files import write_text_atomic
from prism_mcore.training.metrics import plot_metrics, read_metrics

PLOTTED = {
    "sft": ["loss", "val_loss"],
    "warmup": ["loss", "acc"],
    "align": [
        "reward/caption_score_mean",
        "reward/cot_score_mean",
        "critic/d_acc",
        "reward/format_valid_ratio",
        "reward/acc_reward/mean",
    ],  # fmt: skip
    "rlvr": ["reward/mean", "reward/acc_reward/mean", "reward/format_valid_ratio"],
}


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: no stage of this run has finished yet")
    return json.loads(path.read_text())


def last_logged_steps(run_dir: str | Path) -> dict[str, int]:
    """The last step each stage logged in `metrics.jsonl` (finished or not)."""
    steps: dict[str, int] = {}
    for record in read_metrics(Path(run_dir) / "metrics.jsonl"):
        steps[record["stage"]] = max(steps.get(record["stage"], 0), record["step"])
    return steps


def _cell(value: float | None) -> str:
    return f"{value:7.3f}" if value is not None else "      -"


def stage_table(summary: dict[str, Any], logged_steps: dict[str, int] | None = None) -> str:
    """One row per finished stage: greedy val/test accuracy and format-valid rate (warmup: D's pairwise accuracy);
    one per unfinished stage of `logged_steps` (stage -> last step logged) saying how far it got."""
    lines = [
        f"{'stage':8s} | {'val acc':>7s} | {'val fmt':>7s} | {'test acc':>8s} | {'test fmt':>8s} | note",
        f"{'-' * 8}-+-{'-' * 7}-+-{'-' * 7}-+-{'-' * 8}-+-{'-' * 8}-+-----",
    ]
    for stage in STAGES:
        record = summary["stages"].get(stage)
        if record is None:
            if stage in (logged_steps or {}):
                empty = _cell(None)
                row = f"{stage:8s} | {empty} | {empty} |  {empty} |  {empty} | unfinished: step {logged_steps[stage]}"
                lines.append(row + " logged")
            continue
        evaluation = record.get("eval", {})
        val, test = evaluation.get("val", {}), evaluation.get("test", {})
        note = ""
        if stage == "warmup":
            note = (f"D held-out pairwise acc {record['heldout_accuracy_before']:.3f} -> "
                    f"{record['heldout_accuracy']:.3f}")  # fmt: skip
        lines.append(
            f"{stage:8s} | {_cell(val.get('accuracy'))} | {_cell(val.get('format_valid'))} | "
            f" {_cell(test.get('accuracy'))} |  {_cell(test.get('format_valid'))} | {note}"
        )
    return "\n".join(lines)


def finalize(run_dir: str | Path) -> str:
    """Write the plot, record its path in the summary, and return the text a person reads at the end of a run (or
    at any point of it: an unfinished run shows its finished stages and how far the others got)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no such directory)")
    summary_path = run_dir / "summary.json"
    finished = summary_path.exists()
    summary = load_summary(run_dir) if finished else {"stages": {}}
    logged = last_logged_steps(run_dir)
    if not finished and not logged:
        return f"{run_dir}: no stage has logged a step yet (no summary.json, no metrics.jsonl records)"
    plot = plot_metrics(run_dir / "metrics.jsonl", run_dir / "training_curves.png", PLOTTED)
    if finished:
        summary["plot"] = str(plot)
        write_text_atomic(summary_path, json.dumps(summary, indent=2))
    where = summary_path if finished else "none yet (no stage has finished)"
    return f"{stage_table(summary, logged)}\n\nplot:    {plot}\nsummary: {where}"


def comparison(baseline_dir: str | Path, prism_dir: str | Path) -> str:
    """Test (and val) accuracy of the final policies of two runs, side by side."""
    rows = ["run                         | val acc | test acc | test fmt", "-" * 28 + "+---------+----------+---------"]
    for label, run_dir in (("SFT -> RLVR", baseline_dir), ("SFT -> PRISM -> RLVR", prism_dir)):
        stages = load_summary(run_dir)["stages"]
        final = next(stages[s]["eval"] for s in reversed(STAGES) if s in stages and "eval" in stages[s])
        rows.append(f"{label:27s} | {final['val']['accuracy']:7.3f} | {final['test']['accuracy']:8.3f} | "
                    f"{final['test']['format_valid']:8.3f}")  # fmt: skip
    return "\n".join(rows)
