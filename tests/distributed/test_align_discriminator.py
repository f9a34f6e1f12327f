"""One pass of D per alignment step (issue 13), in the single-process, TP=2 and DP=2 layouts (torchrun, gloo, fp32
on CPU; tests/distributed/workers/align_discriminator.py): the advantage's scores read off the update's forward equal
the old path's eval-mode scoring of each segment alone, and the update itself (metrics, gradient norm, new value
head, the vision tower's gradient) is the same whether each image is encoded once per step (its later micro-batches
reuse the encoding) and the filler is tiny, or every sequence carries its own images and the filler is a full copy;
TP=2 gives the single-process metrics and gradient norm."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.torchrun import run_torchrun
from tests.unit.models.tiny_checkpoints import write_dense, write_moe

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "workers" / "align_discriminator.py"
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("align_discriminator")
    (root / "dense").mkdir()
    moe = write_moe(root / "moe", write_dense(root / "dense"))
    layouts = {"single": (1, []), "tp2": (2, ["--tp", "2"]), "dp2": (2, [])}
    return {
        name: run_torchrun(WORKER, nproc, root / name, ["--moe", str(moe), *args])
        for name, (nproc, args) in layouts.items()
    }


def _close(a, b, tol: float = TOL) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    return abs(a - b) <= tol * max(1.0, abs(b))  # relative beyond 1 (the gradient norm)


@pytest.mark.parametrize("layout", ["single", "tp2", "dp2"])
def test_advantage_scores_come_from_the_update_forward_unchanged(runs, layout: str) -> None:
    for rank in runs[layout]:
        assert _close(rank["scores"], rank["reference_scores"]), (rank["scores"], rank["reference_scores"])
        assert [0.0, 0.0] in rank["scores"]  # the invalid sample scores 0
        assert all(abs(c) > 1e-3 for pair in rank["scores"] if pair != [0.0, 0.0] for c in pair)


@pytest.mark.parametrize("layout", ["single", "tp2", "dp2"])
def test_scores_do_not_depend_on_packing(runs, layout: str) -> None:
    # Measured 0.0 in every layout (2026-12-03); scores that moved with packing would make every comparison of two
    # packings (old code vs new) a comparison of rounding.
    for rank in runs[layout]:
        assert rank["packing_score_diff"] <= 1e-6, rank["packing_score_diff"]


@pytest.mark.parametrize("layout", ["single", "tp2", "dp2"])
def test_shared_images_and_tiny_fillers_leave_the_update_unchanged(runs, layout: str) -> None:
    for rank in runs[layout]:
        assert _close(rank["new"], rank["old"]), (rank["new"], rank["old"])
        assert rank["new"]["vision_grad_norm"] > 1e-3  # the tower's gradient arrived, through its one backward
        assert rank["new"]["metrics"]["valid_ratio"] == pytest.approx(5 / 6)


def test_tensor_parallel_update_equals_the_single_process_one(runs) -> None:
    # Not DP=2: each rank draws the value head's dropout masks from its own stream. Not the new head: Adam's first
    # step is lr * g / (|g| + eps), so gradient entries near 0 move by up to lr on a last-digit difference.
    single = runs["single"][0]["new"]
    for rank in runs["tp2"]:
        assert _close(rank["new"]["metrics"], single["metrics"])
        assert rank["new"]["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)


def test_work_counted(runs) -> None:
    # Each prompt has two images; the micro-batches hold prompt 0, prompts 0 and 1, prompt 1: each of the 4 images
    # is encoded once in the step (8 once per micro-batch, 24 with one copy per segment: 2 images x 12 sequences).
    assert runs["single"][0]["images"] == 4 and runs["single"][0]["fillers"] == 0
    assert [rank["images"] for rank in runs["dp2"]] == [4, 2]
    assert [rank["fillers"] for rank in runs["dp2"]] == [0, 1]  # the second rank's one micro-batch is topped up
