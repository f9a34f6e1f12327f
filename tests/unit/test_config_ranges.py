"""Fail early, one line: out-of-range values, impossible token budgets, zero-step stages, missing paths and the
world size are refused by the CLI before any stage starts (exit code 2, one line naming the key); `recipes` lists
the released recipe files; `report` shows an unfinished run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prism_mcore import cli
from prism_mcore.cli import main
from prism_mcore.config import ConfigError, apply_overrides, load_recipe

REPO = Path(__file__).parents[2]


def refusal(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str) -> str:
    """The one stderr line of a command refused before any stage starts."""
    monkeypatch.setattr(cli, "_stage_runner", lambda stage: pytest.fail(f"stage {stage} started"))
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    return err.removeprefix("error: ")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sft.global_batch_size=0", "sft.global_batch_size=0 is out of range: must be >= 1"),
        ("parallel.tensor=0", "parallel.tensor=0 is out of range: must be >= 1"),
        ("rollout.n=-3", "rollout.n=-3 is out of range: must be >= 1"),
        ("run.log_every=0", "run.log_every=0 is out of range: must be >= 1"),
        ("rollout.temperature=nan", "rollout.temperature=nan must be a finite number"),
        ("align.policy_optim.lr=inf", "align.policy_optim.lr=inf must be a finite number"),
        ("rollout.top_p=1.5", "rollout.top_p=1.5 is out of range: must be in [0, 1]"),
        ("warmup.heldout_fraction=1", "warmup.heldout_fraction=1.0 is out of range: must be in [0, 1)"),
        ("sft.epochs=0", "sft.epochs=0.0 is out of range: must be > 0"),
        ("data.max_row_bytes=0", "data.max_row_bytes=0 is out of range: must be >= 1"),
        ("run.stages=", "run.stages is empty: list at least one of sft, warmup, align, rlvr"),
        ("rlvr.updates_per_rollout=0", "rlvr.updates_per_rollout=0 is out of range: must be >= 1"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, override: str, message: str
) -> None:
    assert refusal(capsys, monkeypatch, "run", override) == message
    from prism_mcore.config.schema import check_ranges

    with pytest.raises(ConfigError, match="out of range|finite|empty"):
        check_ranges(apply_overrides(load_recipe("embedded"), [override]))


@pytest.mark.parametrize("stage", ["align", "rlvr"])
def test_a_stage_of_zero_steps_is_refused_not_marked_done(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    assert refusal(capsys, monkeypatch, stage, f"{stage}.steps=0") == f"{stage}.steps=0 is out of range: must be >= 1"


@pytest.mark.parametrize("stage", ["align", "rlvr"])
def test_more_updates_per_rollout_than_samples_are_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    overrides = [f"{stage}.prompts_per_step=2", "rollout.n=3"]
    from prism_mcore.config.schema import check_ranges

    check_ranges(apply_overrides(load_recipe("embedded"), [*overrides, f"{stage}.updates_per_rollout=6"]))  # one each
    message = refusal(capsys, monkeypatch, "run", *overrides, f"{stage}.updates_per_rollout=7")
    assert message == (
        f"{stage}.updates_per_rollout=7 is more than the 6 samples of a rollout batch ({stage}.prompts_per_step x "
        "rollout.n): each update needs at least one"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.max_tokens_per_microbatch=300"],  # SFT sequences of up to sft.max_length=384 tokens
            "data.max_tokens_per_microbatch=300 cannot hold the longest sft sample: sft.max_length = 384 tokens",
        ),
        (
            ["rlvr.max_tokens_per_microbatch=300"],  # prompts of 256 + responses of 128 tokens
            "rlvr.max_tokens_per_microbatch=300 cannot hold the longest rlvr sample: "
            "data.max_prompt_length + rlvr.max_new_tokens = 384 tokens",
        ),
    ],
)
def test_token_budgets_must_hold_the_longest_sample(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, overrides: list[str], message: str
) -> None:
    assert refusal(capsys, monkeypatch, "run", *overrides) == message


def test_every_released_recipe_passes_the_checks() -> None:
    for name in ("prism", "embedded", *(path.stem for path in (REPO / "examples/recipes").glob("*.py"))):
        config, stages = cli.prepare("run", name, [], world_size=8)
        assert stages == config.run.stages


def test_a_missing_configured_path_is_refused_before_the_first_step(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "val.parquet"
    message = refusal(capsys, monkeypatch, "sft", f"data.val_path={missing}")
    assert message == f"data.val_path={missing}: no such file"
    (tmp_path / "empty.jsonl").write_text("")
    message = refusal(capsys, monkeypatch, "rlvr", f"data.rl_path={tmp_path / 'empty.jsonl'}")
    assert message == f"data.rl_path={tmp_path / 'empty.jsonl'}: the file is empty"
    message = refusal(capsys, monkeypatch, "align", f"model.discriminator_path={tmp_path / 'd'}")
    assert message == f"model.discriminator_path={tmp_path / 'd'}: no such checkpoint folder"


def test_parallel_sizes_must_split_the_world(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = refusal(capsys, monkeypatch, "sft", "parallel.tensor=4")
    assert message == "parallel.tensor x pipeline x context = 4 does not divide the world size 2"


def test_recipes_lists_the_released_recipe_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    released = sorted(path.stem for path in (REPO / "examples/recipes").glob("*.py"))
    assert released and names == ["prism", "embedded", *released]
    # ... and each name it lists is a recipe the CLI takes.
    assert load_recipe("qwen3vl_4b_dapo").rlvr.dynamic_sampling is True


def test_report_shows_an_unfinished_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [{"stage": "sft", "step": step, "time": 0.0, "loss": 1.0 / step} for step in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("sft ") and out[2].endswith("| unfinished: step 3 logged")
    assert (run_dir / "training_curves.png").is_file() and not (run_dir / "summary.json").exists()
    assert out[-1] == "summary: none yet (no stage has finished)"


def test_report_on_a_run_that_has_not_started(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path}: no stage has logged a step yet (no summary.json, no " \
        "metrics.jsonl records)"  # fmt: skip
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'absent'} is not a run folder (no such directory)"
