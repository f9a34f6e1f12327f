"""What a finished run shows a person: the table of accuracy and format-valid rate per stage, the drift table (how
far each stage's policy is from the teacher, `stages.drift`), the training-curve and drift plots, and a side-by-side
comparison of two runs (SFT -> RLVR against SFT -> PRISM -> RLVR).

Everything is read from the run folder (`summary.json`, `metrics.jsonl`), so `python -m prism_mcore report DIR`
works on any finished or interrupted run: a stage that has logged steps but not finished gets a row saying how far
it got, and a run with no finished stage shows just those rows.
"""

from __future__ import annotations

import json
import statistics
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
        "val/caption_f1",
        "val/teacher_caption_nll",
    ],  # fmt: skip
    "rlvr": ["reward/mean", "reward/acc_reward/mean", "reward/format_valid_ratio", "val/caption_f1"],
}

# The drift report's columns: (heading, name in the stage's `eval.val`), then the style pairs (policy, teacher).
DRIFT_COLUMNS = (
    ("cap P", "caption_precision"),
    ("cap R", "caption_recall"),
    ("cap F1", "caption_f1"),
    ("cap exact", "caption_exact"),
    ("acc cap ok", "accuracy_caption_right"),
    ("acc cap bad", "accuracy_caption_wrong"),
    ("T cap NLL", "teacher_caption_nll"),
    ("T CoT NLL", "teacher_cot_nll"),
    ("D gap cap", "d_gap_caption"),
    ("D gap CoT", "d_gap_cot"),
)
STYLE_COLUMNS = (
    ("cap tokens", "caption_tokens", "teacher_caption_tokens"),
    ("cap bullets", "caption_bullets", "teacher_caption_bullets"),
    ("CoT tokens", "cot_tokens", "teacher_cot_tokens"),
)
PLOTTED_DRIFT = ("caption_f1", "caption_exact", "teacher_caption_nll", "teacher_cot_nll", "d_gap_caption", "d_gap_cot")


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


def _value(evaluation: dict[str, Any], name: str, width: int, digits: int = 3) -> str:
    value = evaluation.get(name)
    return f"{value:{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}s}"


def drift_table(summary: dict[str, Any]) -> str:
    """One row per evaluated stage: the drift report on the validation split (caption facts, accuracy by caption,
    teacher NLL, D score gap), then style as policy / teacher, then which discriminator measured each gap."""
    stages = [s for s in STAGES if "eval" in summary["stages"].get(s, {})]
    if not stages:
        return ""
    headings = [heading for heading, _ in DRIFT_COLUMNS]
    lines = [" | ".join([f"{'stage':8s}", *headings]), "-+-".join(["-" * 8] + ["-" * len(h) for h in headings])]
    for stage in stages:
        val = summary["stages"][stage]["eval"].get("val", {})
        cells = [_value(val, name, len(heading)) for heading, name in DRIFT_COLUMNS]
        lines.append(" | ".join([f"{stage:8s}", *cells]))
    style = [f"{'stage':8s}", *(f"{heading + ' policy/teacher':>26s}" for heading, _, _ in STYLE_COLUMNS), "format"]
    lines += ["", " | ".join(style), "-+-".join(["-" * 8] + ["-" * 26] * len(STYLE_COLUMNS) + ["-" * 6])]
    for stage in stages:
        val = summary["stages"][stage]["eval"].get("val", {})
        cells = [f"{_value(val, policy, 17, 1)} / {_value(val, teacher, 6, 1)}" for _, policy, teacher in STYLE_COLUMNS]
        lines.append(" | ".join([f"{stage:8s}", *cells, _value(val, "format_valid", 6)]))
    lines.append("")
    for stage in stages:
        which = summary["stages"][stage].get("drift_discriminator")
        if which:
            lines.append(f"D gap at {stage}: {which}")
    return "\n".join(lines)


def plot_drift(summary: dict[str, Any], png_path: Path) -> Path | None:
    """Bars of the drift figures per evaluated stage (one panel per figure); None when no stage has them."""
    stages = [s for s in STAGES if "caption_f1" in summary["stages"].get(s, {}).get("eval", {}).get("val", {})]
    if not stages:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED_DRIFT), figsize=(2.6 * len(PLOTTED_DRIFT), 3.0), squeeze=False)
    for axis, name in zip(axes[0], PLOTTED_DRIFT, strict=True):
        values = [summary["stages"][s]["eval"]["val"].get(name) for s in stages]
        # Numeric positions: a stage without the figure keeps its place on the axis, with no bar.
        axis.bar(range(len(stages)), [float("nan") if v is None else v for v in values], color="tab:blue")
        axis.set_xticks(range(len(stages)), stages)
        axis.set_xlim(-0.5, len(stages) - 0.5)
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


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
    drift_plot = plot_drift(summary, run_dir / "drift.png")
    if finished:
        summary["plot"] = str(plot)
        if drift_plot is not None:
            summary["drift_plot"] = str(drift_plot)
        write_text_atomic(summary_path, json.dumps(summary, indent=2))
    where = summary_path if finished else "none yet (no stage has finished)"
    drift = drift_table(summary)
    drift = f"\n\ndrift from the teacher on the validation split:\n{drift}" if drift else ""
    plots = f"plot:    {plot}" + (f"\ndrift:   {drift_plot}" if drift_plot else "")
    return f"{stage_table(summary, logged)}{drift}\n\n{plots}\nsummary: {where}"


def final_eval(run_dir: str | Path) -> dict[str, Any]:
    """The evaluation of a run's last evaluated stage (`{"val": ..., "test": ...}`)."""
    stages = load_summary(run_dir)["stages"]
    return next(stages[s]["eval"] for s in reversed(STAGES) if s in stages and "eval" in stages[s])


def comparison(baseline_dir: str | Path, prism_dir: str | Path) -> str:
    """Test (and val) accuracy of the final policies of two runs, side by side, then their drift figures."""
    runs = (("SFT -> RLVR", final_eval(baseline_dir)), ("SFT -> PRISM -> RLVR", final_eval(prism_dir)))
    rows = ["run                         | val acc | test acc | test fmt", "-" * 28 + "+---------+----------+---------"]
    for label, final in runs:
        rows.append(f"{label:27s} | {final['val']['accuracy']:7.3f} | {final['test']['accuracy']:8.3f} | "
                    f"{final['test']['format_valid']:8.3f}")  # fmt: skip
    rows += [
        "",
        f"{'drift (val)':27s} | {runs[0][0]:>11s} | {runs[1][0]:>20s}",
        "-" * 28 + "+-" + "-" * 12 + "+" + "-" * 21,
    ]
    for heading, name in DRIFT_COLUMNS:
        rows.append(f"{heading:27s} | {_value(runs[0][1]['val'], name, 11)} | {_value(runs[1][1]['val'], name, 20)}")
    return "\n".join(rows)


SEED_FIGURES = (("test acc", "test", "accuracy"), ("val acc", "val", "accuracy")) + tuple(
    (heading, "val", name) for heading, name in DRIFT_COLUMNS
)
ARMS = (("SFT -> RLVR", "baseline"), ("SFT -> PRISM -> RLVR", "prism"))


def seed_runs(root: str | Path) -> dict[str, dict[str, Path]]:
    """The `seed<N>/{baseline,prism}` run folders under `root` (what `run_prism.sh --compare --seeds K` writes), by
    seed folder name; a seed whose two runs have not both finished is left out."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of seed runs (no such directory)")
    found = {}
    for folder in sorted(root.glob("seed*")):
        runs = {arm: folder / arm for _, arm in ARMS}
        if all((run / "summary.json").exists() for run in runs.values()):
            found[folder.name] = runs
    if not found:
        raise FileNotFoundError(f"{root} holds no seed<N>/baseline and seed<N>/prism runs with a summary.json")
    return found


def _spread(values: list[float]) -> str:
    """`mean ± sample std (n)`; without the spread for one value, `-` for none."""
    if not values:
        return f"{'-':>21s}"
    spread = f"{statistics.stdev(values):.3f}" if len(values) > 1 else "  -  "
    return f"{f'{statistics.mean(values):.3f} ± {spread} ({len(values)})':>21s}"


def seed_comparison(root: str | Path) -> str:
    """Mean and spread over seeds of both arms' final test/val accuracy and drift figures, and of their per-seed
    difference (PRISM minus baseline); writes `<root>/compare_seeds.png` with every seed's value."""
    runs = seed_runs(root)
    figures: dict[str, dict[str, list[float | None]]] = {heading: {} for heading, _, _ in SEED_FIGURES}
    for arms in runs.values():
        finals = {arm: final_eval(path) for arm, path in arms.items()}
        for heading, split, name in SEED_FIGURES:
            for _, arm in ARMS:
                figures[heading].setdefault(arm, []).append(finals[arm].get(split, {}).get(name))
    width = 21
    rows = [
        f"{len(runs)} seeds ({', '.join(runs)}): mean ± sample std (seeds with a value)",
        f"{'figure':12s} | {ARMS[0][0]:>{width}s} | {ARMS[1][0]:>{width}s} | {'PRISM - baseline':>{width}s}",
        "-+-".join(["-" * 12] + ["-" * width] * 3),
    ]
    for heading, _, _ in SEED_FIGURES:
        base, prism = figures[heading]["baseline"], figures[heading]["prism"]
        differences = [p - b for b, p in zip(base, prism, strict=True) if b is not None and p is not None]
        cells = [_spread([v for v in values if v is not None]) for values in (base, prism, differences)]
        rows.append(f"{heading:12s} | " + " | ".join(cells))
    plot = _plot_seeds(figures, Path(root) / "compare_seeds.png")
    return "\n".join(rows) + f"\n\nplot: {plot}"


def _plot_seeds(figures: dict[str, dict[str, list[float | None]]], png_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [heading for heading in ("test acc", "cap F1", "cap exact", "T cap NLL", "T CoT NLL") if heading in figures]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.8 * len(shown), 3.0), squeeze=False)
    for axis, heading in zip(axes[0], shown, strict=True):
        for position, (_, arm) in enumerate(ARMS):
            values = [v for v in figures[heading][arm] if v is not None]
            axis.scatter([position] * len(values), values, alpha=0.6)
            if values:
                axis.hlines(statistics.mean(values), position - 0.25, position + 0.25, color="black")
        axis.set_xticks(range(len(ARMS)), ["SFT->RLVR", "+PRISM"], fontsize=8)
        axis.set_title(heading, fontsize=9)
        axis.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
