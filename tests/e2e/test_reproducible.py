"""The same command with the same seed logs the same numbers, bit for bit, on CPU; the numbers are the golden ones;
and a replay of the run's rollouts reproduces it without generating.

The shortened pipeline of `test_pipeline` runs twice. Run A builds the embedded default into an empty cache and dumps
its rollouts (`rollout.dump_dir`). Run B finds it built (a copy in another folder, so every data file has another
absolute path), runs from another working folder with another PYTHONHASHSEED while a busy process competes for the
CPU, and is stopped after the warmup and started again, so alignment and RLVR start in a fresh process with nothing
run before them. Both must log the same `metrics.jsonl` (timing fields aside), the same evaluations, and keep
byte-identical self-play responses (whose uids must not name the data files' folders).

Run A's metrics and evaluations must also match `golden_metrics.json` within the tolerances `golden.py` states
(regenerate: `python tools/golden_metrics.py --update`), and a third run with `rollout.replay_dir` on A's dump (every
stage's generate calls served from it: SFT evaluation, warmup self-play, alignment, RLVR) must log A's metrics bit for
bit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.golden import REGENERATE, TIMING_FIELDS, compare, read_golden, run_record
from tests.e2e.test_pipeline import _command, _env, _metrics

REPO = Path(__file__).resolve().parents[2]
SHORTER = [
    "sft.max_steps=4",
    "sft.eval_every=2",
    "warmup.max_steps=3",  # the value head's dropout draws from step 1 on
    "align.steps=2",
    "data.max_eval_prompts=4",
    "rollout.max_new_tokens=32",
    "align.max_new_tokens=32",
    "rlvr.max_new_tokens=32",
]
SPIN_LIMIT_S = 600  # the competing process stops by itself even if the test dies before killing it


@contextmanager
def busy_cpu() -> Iterator[None]:
    """A second process spinning on the CPU for as long as the block runs."""
    spin = f"import time\nend = time.time() + {SPIN_LIMIT_S}\nwhile time.time() < end:\n    pass\n"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def _run(run_dir: Path, cache: Path, cwd: Path, hash_seed: str, *overrides: str) -> None:
    # PYTHONPATH: run this checkout's code from any working folder.
    env = {**_env(), "PRISM_CACHE": str(cache), "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [*_command(run_dir), *SHORTER, *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def _without_timing(run_dir: Path) -> list[dict]:
    return [{key: value for key, value in r.items() if key not in TIMING_FIELDS} for r in _metrics(run_dir)]


def _results(run_dir: Path) -> dict:
    """Each stage's summary record without its export paths (which name the run folder)."""
    stages = json.loads((run_dir / "summary.json").read_text())["stages"]
    return {stage: {k: v for k, v in record.items() if not k.endswith("_hf")} for stage, record in stages.items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Run A: (its run folder, the cache it built, its rollout dump)."""
    root = tmp_path_factory.mktemp("reproducible")
    first, cache, dump = root / "first" / "run", root / "cache", root / "dump"
    _run(first, cache, REPO, "1", f"rollout.dump_dir={dump}")
    assert (cache / "embedded").is_dir()  # run A built the embedded default
    return first, cache, dump


def test_a_second_run_logs_the_same_metrics_bit_for_bit(first_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    first, cache, _ = first_run
    second = tmp_path / "second" / "run"
    cache_copy = tmp_path / "elsewhere" / "cache"
    shutil.copytree(cache, cache_copy)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    with busy_cpu():
        _run(second, cache_copy, workdir, "2", "run.stages=sft,warmup")
        _run(second, cache_copy, workdir, "2")  # skips SFT and the warmup; alignment starts in a new process

    expected, actual = _without_timing(first), _without_timing(second)
    assert [(r["stage"], r["step"]) for r in expected] == [
        *[("sft", step) for step in range(1, 5)],
        ("sft", 4),  # the stage-end drift report
        *[("warmup", step) for step in range(1, 4)],
        ("align", 1),
        ("align", 2),
        ("align", 2),
        ("rlvr", 1),
        ("rlvr", 2),
        ("rlvr", 2),
    ]
    for want, got in zip(expected, actual, strict=True):
        assert got == want, (want["stage"], want["step"])
    assert _results(second) == _results(first)
    kept = "stages/warmup_self_play.json"
    assert (second / kept).read_bytes() == (first / kept).read_bytes()


def test_the_run_logs_the_golden_metrics(first_run: tuple[Path, Path, Path]) -> None:
    differences = compare(read_golden(), run_record(first_run[0]))
    assert not differences, f"{len(differences)} differences from the golden metrics (after an intended change: " + (
        f"{REGENERATE}):\n" + "\n".join(differences[:40])
    )


def test_a_replay_of_the_dumped_rollouts_logs_the_same_metrics_bit_for_bit(
    first_run: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    first, cache, dump = first_run
    assert {folder.name for folder in dump.iterdir()} == {"sft", "warmup", "align", "rlvr"}
    replayed = tmp_path / "replayed" / "run"
    _run(replayed, cache, REPO, "1", f"rollout.replay_dir={dump}")
    assert _without_timing(replayed) == _without_timing(first)
    assert _results(replayed) == _results(first)
