"""Step checkpoints in one process (the tiny Megatron GPT, AdamW, a cosine schedule): loading runs no code planted in
a checkpoint, RNG states come back exactly, a damaged newest checkpoint is set aside for the previous one (and the
run then continues with exactly the losses of the uninterrupted run), and saving starts no helper process."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch

from prism_mcore.config.schema import OptimConfig, ParallelConfig
from tests.tiny_gpt import build_gpt, forward_step, microbatches

SAVED_STEPS, TOTAL_STEPS = (1, 2, 3), 5


class PlantedCode:
    """Unpickling this object creates `marker`: the proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def runtime() -> None:
    from prism_mcore.runtime import init_distributed

    init_distributed(ParallelConfig(), seed=0)


def _trainable():
    from prism_mcore.runtime import seed_everything
    from prism_mcore.training.step import build_optimizer, wrap_ddp

    seed_everything(7)  # every trainable starts from the same weights
    models = wrap_ddp([build_gpt()], use_distributed_optimizer=False)
    optim = OptimConfig(lr=1e-3, weight_decay=0.01, clip_grad=1.0, schedule="cosine", warmup_steps=2)
    optimizer, scheduler = build_optimizer(models, optim, TOTAL_STEPS, use_distributed_optimizer=False, bf16=False)
    return {"gpt": SimpleNamespace(models=models, optimizer=optimizer, scheduler=scheduler)}


def _train(trainables, step: int) -> float:
    from prism_mcore.training.step import train_step

    gpt = trainables["gpt"]
    return train_step(gpt.models, gpt.optimizer, gpt.scheduler, forward_step, microbatches(step, 0, 1)).metrics["loss"]


def _draws() -> list[float]:
    """One number from every generator a checkpoint restores (Python, NumPy, torch, Megatron's tracker)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracked = torch.rand(1).item()
    return [random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()),
            torch.rand(1).item(), tracked]  # fmt: skip


@pytest.fixture(scope="module")
def reference(runtime: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, float], list[float]]:
    """Checkpoints after steps 1, 2, 3 of an uninterrupted 5-step run, its losses, and the draws made right after
    the last save."""
    from prism_mcore.training.resume import CheckpointManager

    root = tmp_path_factory.mktemp("ckpt") / "gpt"
    manager = CheckpointManager(root, keep_last=len(SAVED_STEPS))
    backend_settings = {key: value for key, value in os.environ.items() if key.startswith("NVTE_")}
    trainables = _trainable()
    losses, draws = {}, []
    for step in range(TOTAL_STEPS):
        losses[step + 1] = _train(trainables, step)
        if step + 1 in SAVED_STEPS:
            random.gauss(0, 1), np.random.randn()  # leave a cached Gaussian in both generators' states
            manager.save(step + 1, trainables, meta={"state": {"data_position": step + 1}})
            draws = _draws()
    assert manager.steps() == list(SAVED_STEPS)
    # Building a model writes its attention backend into os.environ; conftest undoes that per test, not per module.
    for key in [key for key in os.environ if key.startswith("NVTE_")]:
        del os.environ[key]
    os.environ.update(backend_settings)
    return root, losses, draws


@pytest.fixture()
def checkpoints(reference, tmp_path: Path) -> Path:
    """A private copy of the reference checkpoints, to damage."""
    root = tmp_path / "gpt"
    shutil.copytree(reference[0], root)
    return root


def _restore(root: Path):
    from prism_mcore.training.resume import CheckpointManager

    trainables = _trainable()
    return CheckpointManager(root, keep_last=len(SAVED_STEPS)).restore(trainables), trainables


def _rehash(checkpoint: Path, relative: str) -> None:
    """Make the manifest agree with a file changed after saving (what anyone who can write the folder can do)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = (checkpoint / relative).read_bytes()
    manifest["files"][relative] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_rng_files_hold_only_tensors_and_restore_every_generator_exactly(reference, checkpoints: Path) -> None:
    _, losses, draws = reference
    state = torch.load(checkpoints / "step_3" / "rng_rank0.pt", weights_only=True)
    assert set(state) >= {"python", "numpy", "torch", "tracker"}
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # anything else
    record, trainables = _restore(checkpoints)
    assert record["step"] == 3 and record["meta"] == {"state": {"data_position": 3}}
    assert _draws() == draws  # bit-exact, including the cached Gaussians
    assert [_train(trainables, step) for step in (3, 4)] == [losses[4], losses[5]]


@pytest.mark.parametrize("planted", ["rng_rank0.pt", "gpt/.metadata"])
def test_planted_pickle_never_runs_and_resume_falls_back(
    reference, checkpoints: Path, tmp_path: Path, planted: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The planted file is listed in the manifest with its new hash: only the loader's refusal to unpickle code
    stands between it and the marker."""
    marker = tmp_path / "code-ran"
    newest = checkpoints / "step_3"
    if planted.endswith(".pt"):
        torch.save({"python": PlantedCode(marker)}, newest / planted)
    else:
        (newest / planted).write_bytes(pickle.dumps(PlantedCode(marker)))
    _rehash(newest, planted)
    with caplog.at_level(logging.WARNING):
        record, trainables = _restore(checkpoints)
    assert not marker.exists()
    assert record["step"] == 2
    assert "step_3 is unusable" in caplog.text and planted.split("/")[-1] in caplog.text
    _, losses, _ = reference
    assert [_train(trainables, step) for step in (2, 3, 4)] == [losses[3], losses[4], losses[5]]


def test_non_tensor_values_in_a_dist_checkpoint_cannot_run_code(runtime: None, tmp_path: Path) -> None:
    from megatron.core.dist_checkpointing import ShardedTensor

    from prism_mcore.training.checkpoint import dist_load, dist_save

    marker = tmp_path / "code-ran"
    weight = torch.arange(6.0).reshape(2, 3)
    saved = {"weight": ShardedTensor.from_rank_offsets("weight", weight), "extra": PlantedCode(marker)}
    (tmp_path / "ckpt").mkdir()
    dist_save(saved, tmp_path / "ckpt")
    target = {"weight": ShardedTensor.from_rank_offsets("weight", torch.zeros(2, 3)), "extra": None}
    with pytest.raises(pickle.UnpicklingError, match="refused to unpickle .*io.open"):
        dist_load(target, tmp_path / "ckpt")
    assert not marker.exists()
    safe = {"weight": ShardedTensor.from_rank_offsets("weight", weight), "extra": {"note": "plain", "step": 3}}
    (tmp_path / "safe").mkdir()
    dist_save(safe, tmp_path / "safe")
    target = {"weight": ShardedTensor.from_rank_offsets("weight", torch.zeros(2, 3)), "extra": None}
    loaded = dist_load(target, tmp_path / "safe")
    assert torch.equal(loaded["weight"], weight) and loaded["extra"] == {"note": "plain", "step": 3}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_json(path: Path) -> None:
    text = path.read_text()
    path.write_text("{" * len(text))  # same size: only the hash tells


DAMAGE = {
    "truncated shard": (lambda step: _truncate(step / "gpt" / "__0_0.distcp"), "__0_0.distcp has"),
    "truncated metadata": (lambda step: _truncate(step / "gpt" / ".metadata"), ".metadata has"),
    "missing rng file": (lambda step: (step / "rng_rank0.pt").unlink(), "rng_rank0.pt is missing"),
    "garbled meta.json": (lambda step: _garble_json(step / "meta.json"), "meta.json does not match"),
    "no manifest": (lambda step: (step / "manifest.json").unlink(), "manifest.json is missing"),
    "garbled manifest": (lambda step: _garble_json(step / "manifest.json"), "JSONDecodeError"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    reference, checkpoints: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    harm, reason = DAMAGE[damage]
    harm(checkpoints / "step_3")
    with caplog.at_level(logging.WARNING):
        record, trainables = _restore(checkpoints)
    assert record["step"] == 2 and record["meta"] == {"state": {"data_position": 2}}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "unusable" in r.message]
    assert len(warnings) == 1 and "step_3" in warnings[0] and reason in warnings[0], warnings
    assert sorted(p.name for p in checkpoints.iterdir()) == ["bad-step_3", "step_1", "step_2"]
    _, losses, _ = reference
    assert [_train(trainables, step) for step in (2, 3, 4)] == [losses[3], losses[4], losses[5]]


def test_no_usable_checkpoint_starts_from_step_zero(checkpoints: Path, caplog: pytest.LogCaptureFixture) -> None:
    for step in SAVED_STEPS:
        _truncate(checkpoints / f"step_{step}" / "gpt" / "__0_0.distcp")
    fresh = _trainable()
    with caplog.at_level(logging.WARNING):
        record, restored = _restore(checkpoints)
    assert record is None
    assert sum("unusable" in r.getMessage() for r in caplog.records) == 3
    assert "starting from step 0" in caplog.text
    for mine, theirs in zip(restored["gpt"].models[0].parameters(), fresh["gpt"].models[0].parameters(), strict=True):
        assert torch.equal(mine, theirs)  # nothing half-loaded


def test_a_checkpoint_renamed_to_another_step_is_refused(checkpoints: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(checkpoints / "step_1", checkpoints / "step_9")
    with caplog.at_level(logging.WARNING):
        record, _ = _restore(checkpoints)
    assert record["step"] == 3 and "step_9 is unusable" in caplog.text


def test_saving_starts_no_process(runtime: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper process would outlive a killed trainer. (Megatron creates its write-results queue on the first save
    of a process: start from there.)"""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from prism_mcore.training.resume import CheckpointManager

    monkeypatch.setattr(filesystem_async, "_results_queue", None)

    before = {child.pid for child in psutil.Process().children(recursive=True)}
    CheckpointManager(tmp_path / "gpt").save(1, _trainable())
    started = [c for c in psutil.Process().children(recursive=True) if c.pid not in before]
    assert started == [], [" ".join(c.cmdline()) for c in started]


def test_rng_is_kept_fresh_when_the_world_size_changed(reference, checkpoints: Path) -> None:
    """Another world size (e.g. 2 ranks saved, 1 loads): rank 0's saved streams belong to another layout, so the
    weights, optimizer and schedule come back and the generators keep the seeds this run set."""
    _, losses, saved_draws = reference
    manifest = json.loads((checkpoints / "step_3" / "manifest.json").read_text())
    manifest["world_size"] = 2
    (checkpoints / "step_3" / "manifest.json").write_text(json.dumps(manifest))
    record, trainables = _restore(checkpoints)
    restored_draws = _draws()
    _trainable()  # seeds every generator as a fresh start does, and draws the same initial weights
    fresh_draws = _draws()
    assert record["step"] == 3 and restored_draws == fresh_draws != saved_draws
    assert [_train(trainables, step) for step in (3, 4)] == [losses[4], losses[5]]
