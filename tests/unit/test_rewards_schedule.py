"""Validation protocol and RLVR schedule as the released scripts run them (issue 11; PRISM_SPEC §4, §5.1):
validation before training (logged as step 0), per-recipe validation sampling and length, test_freq 6 / save_freq
120 in RLVR, and DAPO's stop after 30 epochs of its data (verl's total_epochs) when that comes before `steps`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from prism_mcore.config import load_recipe
from prism_mcore.stages.evaluation import validation_params
from prism_mcore.stages.rlvr import DynamicSampling, epoch_batch_cap
from prism_mcore.training.loop import DataExhausted, run_steps
from prism_mcore.training.metrics import MetricsLogger, read_metrics
from prism_mcore.training.resume import CheckpointManager

RECIPES = Path(__file__).parents[2] / "examples" / "recipes"
SAMPLED_VALIDATION = {"qwen3vl_4b_dapo", "qwen3vl_4b_gspo"}  # val_kwargs: temperature 1.0, top_p 0.7


@pytest.mark.parametrize("name", sorted(path.stem for path in RECIPES.glob("*.py")))
def test_released_recipes_validate_and_save_as_the_scripts(name: str) -> None:
    config = load_recipe(str(RECIPES / f"{name}.py"))
    rlvr, align = config.rlvr, config.align
    assert (rlvr.eval_every, rlvr.save_every, rlvr.val_before_train, rlvr.max_epochs) == (6, 120, True, 30)
    params = validation_params(rlvr, seed=0)
    assert (params.n, params.max_new_tokens) == (1, 8192)
    if name in SAMPLED_VALIDATION:
        assert (params.temperature, params.top_p, params.greedy) == (1.0, 0.7, False)
    else:
        assert params.greedy and params.top_p == 1.0
    # PRISM alignment (qwen3_vl_prism.sh): greedy validation every 8 steps and before training, checkpoints every 500
    align_params = validation_params(align, seed=0)
    assert (align.eval_every, align.save_every, align.val_before_train) == (8, 500, True)
    assert align_params.greedy and align_params.max_new_tokens == 6144


def test_embedded_default_skips_validation_and_is_not_capped_by_epochs() -> None:
    config = load_recipe("embedded")
    for stage in (config.align, config.rlvr):
        assert (stage.eval_every, stage.val_before_train) == (0, False)
        assert validation_params(stage, seed=0).max_new_tokens == 128
    # 400 RL prompts, 8 per step: 30 epochs hold 1500 batches, far more than the 30 steps.
    assert epoch_batch_cap(400, config.rlvr.prompts_per_step, config.rlvr.max_epochs) == 1500


def test_epoch_batch_cap_counts_whole_batches() -> None:
    assert epoch_batch_cap(2000, 96, 30) == 600  # the released DAPO on ~2K prompts: ~600 steps, not 1500
    assert epoch_batch_cap(2000, 32, 30) == 1860  # GRPO/GSPO: 1500 steps come first
    assert epoch_batch_cap(191, 96, 30) == 30  # the incomplete batch is dropped, as verl's loader
    assert epoch_batch_cap(10, 96, 0) is None
    with pytest.raises(ValueError, match="10 RL prompts are fewer than one batch of 96"):
        epoch_batch_cap(10, 96, 30)


@pytest.fixture(autouse=True)
def checkpoints_without_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """These loops train nothing: a checkpoint is its step folder and the meta record the loop resumes from."""

    def save(self: CheckpointManager, step: int, trainables: dict, meta: dict | None = None) -> Path:
        assert not trainables
        folder = self.root / f"step_{step}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"step": step, "meta": meta or {}, "schedulers": {}}))
        return folder

    def restore(self: CheckpointManager, trainables: dict) -> dict | None:
        assert not trainables
        steps = self.steps()
        return json.loads((self.root / f"step_{steps[-1]}" / "meta.json").read_text()) if steps else None

    monkeypatch.setattr(CheckpointManager, "save", save)
    monkeypatch.setattr(CheckpointManager, "restore", restore)


def _context(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(
        config=SimpleNamespace(run=SimpleNamespace(keep_last=5, log_every=1, max_skipped_step_fraction=0.1)),
        metrics=MetricsLogger(tmp_path, tensorboard=False),
        run_path=lambda folder, name: tmp_path / folder / name,
    )


def _sampling(informative: str, cap: int, groups_per_step: int = 1) -> DynamicSampling:
    """Dynamic sampling over generation batches of one prompt with two responses: batch i's responses differ in
    accuracy (an informative group) where `informative[i]` is "T"; at most `cap` batches (the epoch cap)."""

    def generate_batch(step: int, index: int) -> list[SimpleNamespace]:
        accuracies = (1.0, 0.0) if informative[index] == "T" else (0.0, 0.0)
        return [SimpleNamespace(uid=f"prompt{index}", accuracy=value, step=step) for value in accuracies]

    return DynamicSampling(generate_batch, groups_per_step, max_generation_batches=10, batch_cap=cap)


def _step_fn(sampling: DynamicSampling):
    def step_fn(step: int) -> dict[str, float]:
        samples, metrics = sampling.step_samples(step)
        assert {sample.step for sample in samples} == {step}
        return {"reward/mean": float(step), **metrics}

    return step_fn


def test_dynamic_sampling_draws_batches_until_enough_informative_groups() -> None:
    sampling = _sampling("FTTFFTT", cap=7, groups_per_step=2)
    samples, metrics = sampling.step_samples(0)  # batches 0 (dropped), 1, 2
    assert [sample.uid for sample in samples] == ["prompt1", "prompt1", "prompt2", "prompt2"]
    assert metrics == {"dynamic_sampling/generation_batches": 3, "dynamic_sampling/kept_ratio": 2 / 3}
    assert sampling.state_dict() == {"generation_batches": 3}
    sampling.load_state_dict({"generation_batches": 5})  # resumed: the next step starts at batch 5
    samples, metrics = sampling.step_samples(1)
    assert [sample.uid for sample in samples] == ["prompt5", "prompt5", "prompt6", "prompt6"]
    assert metrics["dynamic_sampling/kept_ratio"] == 1.0
    with pytest.raises(DataExhausted, match="7 generation batches"):
        sampling.step_samples(2)


def test_validation_before_training_is_step_zero_and_data_exhaustion_ends_the_stage(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    validations = []

    def before_training() -> dict[str, float]:
        validations.append(len(validations))
        return {"val/accuracy": 0.25}

    # Steps draw 2, 1, 3 generation batches; the data holds 7: step 4 (index 3) runs out after one batch.
    sampling = _sampling("FTTFFTF", cap=7)
    done = run_steps(
        ctx,
        "rlvr",
        {},
        total_steps=10,
        save_every=0,
        step_fn=_step_fn(sampling),
        state=sampling,
        before_training=before_training,
    )
    assert done == 3 and validations == [0]
    records = [
        (r["step"], r.get("dynamic_sampling/generation_batches")) for r in read_metrics(tmp_path / "metrics.jsonl")
    ]
    assert records == [(0, None), (1, 2), (2, 1), (3, 3)]
    manager = CheckpointManager(tmp_path / "checkpoints" / "rlvr")
    assert manager.steps() == [3]  # the last completed step is saved when the data runs out
    assert manager.restore({})["meta"]["state"] == {"generation_batches": 7}  # all drawn; the format of before

    # A resumed run restores the data position (all 7 batches drawn), runs out at once, and validates no second time.
    resumed = _sampling("FTTFFTF", cap=7)
    done = run_steps(
        ctx,
        "rlvr",
        {},
        total_steps=10,
        save_every=0,
        step_fn=_step_fn(resumed),
        state=resumed,
        before_training=before_training,
    )
    assert done == 3 and resumed.state_dict() == {"generation_batches": 7} and validations == [0]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]


def test_a_stage_with_enough_data_runs_all_its_steps(tmp_path: Path) -> None:
    sampling = _sampling("TTTTTTT", cap=7)
    done = run_steps(
        _context(tmp_path), "rlvr", {}, total_steps=3, save_every=2, step_fn=_step_fn(sampling), state=sampling
    )
    assert done == 3 and CheckpointManager(tmp_path / "checkpoints" / "rlvr").steps() == [2, 3]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]  # no validation: none asked
