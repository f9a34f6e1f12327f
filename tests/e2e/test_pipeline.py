"""The whole pipeline, shortened: SFT -> discriminator warmup -> PRISM alignment -> GRPO on the embedded default,
killed with SIGKILL in the middle of alignment and started again with the same command.

Checks that every stage ran and left its export and evaluation, that every logged metric is finite, that the
restarted run skipped the finished stages and resumed alignment from its last checkpoint, and that the run folder
ends with the summary, the plot and the config. A second, shorter run goes through all stages on two ranks at TP=2.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.torchrun import free_port

SHORT = [
    "sft.max_steps=6",
    "sft.global_batch_size=8",
    "sft.eval_every=3",
    "warmup.max_steps=2",
    "warmup.global_batch_size=8",
    "warmup.self_play_pairs=8",
    "align.steps=4",
    "align.prompts_per_step=2",
    "align.save_every=1",
    "align.eval_every=2",
    "rlvr.steps=2",
    "rlvr.prompts_per_step=2",
    "rollout.n=4",
    "rollout.max_new_tokens=48",
    "align.max_new_tokens=48",
    "rlvr.max_new_tokens=48",
    "data.max_eval_prompts=16",
    "run.log_every=1",
    "rollout.offload_during_training=true",  # the local engine refuses to generate while its memory is released
]


def _command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "prism_mcore", "run", "--recipe", "embedded", f"run.output_dir={run_dir}", *SHORT]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    first_log = open(run_dir.parent / "first.log", "w")  # noqa: SIM115  closed below
    process = subprocess.Popen(_command(run_dir), env=_env(), stdout=first_log, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    # Kill once alignment has finished two steps (and checkpointed them): mid-stage, after two stages are done.
    while time.time() < deadline and process.poll() is None:
        if sum(record["stage"] == "align" for record in _metrics(run_dir)) >= 2:
            break
        time.sleep(0.5)
    assert process.poll() is None, (run_dir.parent / "first.log").read_text()[-4000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_log.close()
    resumed = subprocess.run(_command(run_dir), env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    return run_dir, resumed.stdout + resumed.stderr


def test_every_stage_ran_with_finite_metrics(killed_and_resumed: tuple[Path, str]) -> None:
    run_dir, _ = killed_and_resumed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["sft", "warmup", "align", "rlvr"]
    for stage in ("sft", "align", "rlvr"):
        evaluation = summary["stages"][stage]["eval"]
        for split in ("val", "test"):
            assert evaluation[split]["num_prompts"] == 16
            assert 0.0 <= evaluation[split]["accuracy"] <= 1.0 and 0.0 <= evaluation[split]["format_valid"] <= 1.0
        assert (Path(summary["stages"][stage]["policy_hf"]) / "config.json").exists()
    assert 0.0 <= summary["stages"]["warmup"]["heldout_accuracy"] <= 1.0
    kept = json.loads((run_dir / "stages" / "warmup_self_play.json").read_text())  # a restarted warmup reuses them
    assert len(kept["uids"]) == len(kept["responses"]) == 8 and all(kept["responses"])
    assert Path(summary["plot"]).stat().st_size > 0
    assert json.loads((run_dir / "config.json").read_text())["align"]["steps"] == 4
    records = _metrics(run_dir)
    for stage, steps in (("sft", 6), ("warmup", 2), ("align", 4), ("rlvr", 2)):
        logged = [r["step"] for r in records if r["stage"] == stage and "drift/accuracy" not in r]
        assert logged == list(range(1, steps + 1)), (stage, logged)  # resumed steps replace, never duplicate
        # The stage-end drift report: one record at the last step (warmup has no policy of its own to measure).
        drift = [r for r in records if r["stage"] == stage and "drift/accuracy" in r]
        assert [r["step"] for r in drift] == ([] if stage == "warmup" else [steps]), (stage, drift)
        assert all("drift/teacher_caption_nll" in r and "drift/caption_exact" in r for r in drift)
    for record in records:  # the logger writes null for NaN/Inf
        for key, value in record.items():
            assert value is not None, (record["stage"], record["step"], key)
            if isinstance(value, float):
                assert math.isfinite(value), (record["stage"], record["step"], key)
    align = [r for r in records if r["stage"] == "align" and "drift/accuracy" not in r]  # the steps
    for name in ("critic/d_loss", "critic/d_acc", "actor/pg_loss", "reward/caption_score_mean", "actor/entropy"):
        assert all(name in r for r in align), name
    assert [r["step"] for r in align if "val/accuracy" in r] == [2, 4]  # align.eval_every=2
    assert all(0.0 <= r["val/format_valid"] <= 1.0 for r in align if "val/format_valid" in r)


def test_restart_skips_finished_stages_and_resumes_alignment(killed_and_resumed: tuple[Path, str]) -> None:
    _, output = killed_and_resumed
    assert "sft: already done, skipped" in output
    assert "warmup: already done, skipped" in output
    assert "align: resumed from" in output


@pytest.mark.distributed
def test_the_stages_run_at_tensor_parallel_size_two(tmp_path: Path) -> None:
    """Two ranks at TP=2: the MoE discriminator then runs with sequence parallelism, on padded micro-batches."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "prism_mcore", "run", "--recipe", "embedded", f"run.output_dir={run_dir}", "parallel.tensor=2",
        *SHORT, "sft.max_steps=2", "align.steps=2",
    ]  # fmt: skip
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["sft", "warmup", "align", "rlvr"]
    records = _metrics(run_dir)
    assert [r["step"] for r in records if r["stage"] == "align" and "drift/accuracy" not in r] == [1, 2]
    for record in records:
        for key, value in record.items():
            assert value is not None and (not isinstance(value, float) or math.isfinite(value)), (record, key)
