"""The runtime must not change results: the same tiny Megatron GPT trained 5 AdamW steps gives the same losses
(relative difference <= 1e-5) with TP=2, PP=2 and DP=2 as in one process (torchrun, gloo on CPU), also when the DP
ranks hold unequal shares of the batch or one holds none (it runs zero-loss fillers); and a run
restored from a step checkpoint continues with exactly the losses of the uninterrupted run."""

from pathlib import Path

import pytest

from tests.torchrun import run_torchrun

WORKER = Path(__file__).parent / "workers" / "gpt_layouts.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("layouts")
    init = root / "init"
    (result,) = run_torchrun(WORKER, 1, root / "single", ["--init", str(init), "--save-init"])
    return init, result


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [["--tp", "2"], ["--pp", "2"], [], ["--split", "uneven"], ["--split", "empty"]],
    ids=["tp2", "pp2", "dp2", "dp2-uneven", "dp2-empty-rank"],
)
def test_layout_matches_single_process(reference: tuple[Path, dict], layout: list[str], tmp_path: Path) -> None:
    init, single = reference
    ranks = run_torchrun(WORKER, 2, tmp_path, ["--init", str(init), *layout])
    losses = list(single["losses"].values())
    assert len(losses) == 5 and losses[-1] < losses[0]  # the optimizer really trains
    for rank in ranks:  # every rank reports the same, fully reduced numbers
        assert rank["losses"] == pytest.approx(single["losses"], rel=1e-5)
        assert rank["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-5)


@pytest.mark.distributed
def test_resumed_run_continues_exactly(reference: tuple[Path, dict], tmp_path: Path) -> None:
    """Save at step 2 of 5 under TP=2, restart from the checkpoint in new processes: steps 3-5 are identical."""
    init, single = reference
    common = ["--init", str(init), "--tp", "2", "--resume-dir", str(tmp_path / "ckpt")]
    (first, _) = run_torchrun(WORKER, 2, tmp_path / "a", [*common, "--save-at", "2"])
    (tmp_path / "ckpt" / ".tmp-step_4").mkdir()  # debris of a save killed mid-write: must be ignored
    (resumed, _) = run_torchrun(WORKER, 2, tmp_path / "b", [*common, "--resume"])
    assert sorted(resumed["losses"]) == ["3", "4", "5"]
    for step in ("3", "4", "5"):
        assert resumed["losses"][step] == pytest.approx(first["losses"][step], rel=1e-6)
        assert resumed["lrs"][step] == pytest.approx(first["lrs"][step], rel=1e-12)
