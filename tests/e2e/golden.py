"""Golden metrics: what the shortened four-stage pipeline of `test_reproducible` logs, kept in the repository
(`golden_metrics.json` next to this file) so that a change that moves the numbers is seen.

Regenerate after an intended change with `python tools/golden_metrics.py --update` (it runs that pipeline, about a
minute on a quiet machine, and rewrites the file); `python tools/golden_metrics.py` runs it and lists differences.

Tolerances. On one machine and software stack the run is bit-for-bit reproducible (`test_reproducible`), so any
difference there is a change. Across CPUs and torch/oneDNN builds, float sums may be reassociated (another vector
width), which moves a value by rounding and grows a little over the run's fifteen optimizer steps: relative 1e-4
(absolute 1e-6 near zero) absorbs that. What a real change does is much larger: one sampled token more or less moves
a response-length mean by 1/8 (eight responses a step), a learning rate, a default or a loss change moves the losses
by 1e-3 and more. The rows (stage, step) and the metric names must match exactly: a metric added, removed or renamed
is a change of the run's output too. Timing fields are left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

GOLDEN_PATH = Path(__file__).with_name("golden_metrics.json")
TIMING_FIELDS = ("time", "step_time_s")  # wall-clock values: the only fields allowed to differ between runs
RELATIVE_TOLERANCE = 1e-4
ABSOLUTE_TOLERANCE = 1e-6
REGENERATE = "python tools/golden_metrics.py --update"


def run_record(run_dir: Path) -> dict[str, Any]:
    """A run's metrics rows without timing fields, and each stage's summary record without its export paths."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = json.loads((run_dir / "summary.json").read_text())["stages"]
    return {
        "metrics": [{key: value for key, value in row.items() if key not in TIMING_FIELDS} for row in rows],
        "results": {
            stage: {key: value for key, value in record.items() if not key.endswith("_hf")}
            for stage, record in stages.items()
        },
    }


def _close(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or not isinstance(expected, int | float):
        return expected == actual
    if isinstance(actual, bool) or not isinstance(actual, int | float):
        return False
    return math.isclose(expected, actual, rel_tol=RELATIVE_TOLERANCE, abs_tol=ABSOLUTE_TOLERANCE)


def _differences(expected: Any, actual: Any, where: str) -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = [f"{where}: {key!r} missing" for key in expected if key not in actual]
        found += [f"{where}: {key!r} not in the golden file" for key in actual if key not in expected]
        for key in expected.keys() & actual.keys():
            found += _differences(expected[key], actual[key], f"{where}.{key}")
        return found
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{where}: {len(actual)} entries, golden {len(expected)}"]
        return [
            d
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
            for d in _differences(e, a, f"{where}[{i}]")
        ]
    return [] if _close(expected, actual) else [f"{where}: {actual!r}, golden {expected!r}"]


def compare(golden: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Every difference beyond the tolerances, one line each, rows named by stage and step."""
    found = []
    expected_rows, actual_rows = golden["metrics"], actual["metrics"]
    keys = [(row["stage"], row["step"]) for row in expected_rows]
    if keys != [(row["stage"], row["step"]) for row in actual_rows]:
        found.append(f"metrics rows: {[(r['stage'], r['step']) for r in actual_rows]}, golden {keys}")
    else:
        for (stage, step), want, got in zip(keys, expected_rows, actual_rows, strict=True):
            found += _differences(want, got, f"{stage} step {step}")
    return found + _differences(golden["results"], actual["results"], "results")


def read_golden() -> dict[str, Any]:
    return json.loads(GOLDEN_PATH.read_text())


def write_golden(record: dict[str, Any], command: list[str]) -> None:
    payload = {"regenerate": REGENERATE, "command": command, **record}
    GOLDEN_PATH.write_text(json.dumps(payload, indent=1) + "\n")
