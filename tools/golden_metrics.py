"""Run the shortened four-stage pipeline of `tests/e2e/test_reproducible.py` and compare its metrics with the golden
ones (`tests/e2e/golden_metrics.json`), or rewrite them after an intended change.

    python tools/golden_metrics.py --update          # run, then rewrite the golden file
    python tools/golden_metrics.py                   # run, then list the differences (exit 1 when any)
    python tools/golden_metrics.py --run-dir DIR     # compare (or --update from) a finished run of that command

The run is the reproducibility test's run A (same overrides, PYTHONHASHSEED, thread count), on the embedded default
in the usual cache (`$PRISM_CACHE`, else the repository's `.cache/`); about a minute on a quiet machine. Tolerances
and what they are for: `tests/e2e/golden.py`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline command and the comparison live with the tests

from prism_mcore.data.embedded.build import default_root  # noqa: E402
from tests.e2e.golden import GOLDEN_PATH, compare, read_golden, run_record, write_golden  # noqa: E402
from tests.e2e.test_pipeline import _command  # noqa: E402
from tests.e2e.test_reproducible import SHORTER, _run  # noqa: E402

HASH_SEED = "1"  # run A's


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help=f"rewrite {GOLDEN_PATH.relative_to(REPO)}")
    parser.add_argument("--run-dir", type=Path, help="a finished run of the same command, instead of running it")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="golden_") as scratch:
        run_dir = args.run_dir
        if run_dir is None:
            run_dir = Path(scratch) / "run"
            cache = default_root().parents[1]  # <cache>/embedded/<version> -> <cache>
            print(f"running the shortened pipeline in {run_dir} ...", flush=True)
            _run(run_dir, cache, REPO, HASH_SEED)
        record = run_record(run_dir)
    if args.update:
        command = ["python", *_command(Path("RUN_DIR"))[1:], *SHORTER]
        write_golden(record, command)
        print(f"wrote {GOLDEN_PATH} ({len(record['metrics'])} metric rows)")
        return 0
    differences = compare(read_golden(), record)
    for line in differences:
        print(line)
    print(f"{len(differences)} differences from {GOLDEN_PATH}")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
