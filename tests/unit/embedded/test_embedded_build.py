"""Building the embedded default: the same bytes every build, the caller's random state left alone, reuse of a
complete build, one builder among concurrent callers, no partial folder after a failed or killed build, and the cache
location."""

from __future__ import annotations

import hashlib
import json
import os
import random
import runpy
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from prism_mcore.data.embedded import EmbeddedAssets, TaskSizes, default_root, ensure_embedded
from prism_mcore.data.embedded import build as build_module

SMALL = TaskSizes(sft=16, warmup=8, align=8, rl=8, val=8, test=8)  # builds in about a second


def _hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record the staging folder of every build from now on."""
    builds: list[Path] = []
    write_all = build_module._write_all

    def counting(out: Path, sizes: TaskSizes, seed: int) -> None:
        builds.append(out)
        write_all(out, sizes, seed)

    monkeypatch.setattr(build_module, "_write_all", counting)
    return builds


def test_builds_are_byte_identical(tmp_path: Path, assets: EmbeddedAssets) -> None:
    first = ensure_embedded(tmp_path / "first", sizes=SMALL)
    # The second build runs in another process with another string-hash seed: nothing may depend on either.
    script = (
        "import sys; from prism_mcore.data.embedded import TaskSizes, ensure_embedded; "
        f"ensure_embedded(sys.argv[1], sizes=TaskSizes(**{asdict(SMALL)!r}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "second")], check=True, env=env)
    second = EmbeddedAssets.at(tmp_path / "second")
    hashes = _hashes(first.root)
    assert hashes == _hashes(second.root)
    assert first.manifest() == second.manifest()
    assert first.manifest()["files"] == hashes  # the manifest lists every file and its digest
    assert len([name for name in hashes if name.startswith("data/images/")]) == SMALL.sft + SMALL.warmup
    # The tokenizer, processor and weights do not depend on the split sizes: the default build has the same ones.
    default_hashes = assets.manifest()["files"]
    for name, digest in hashes.items():
        if not name.startswith("data/"):
            assert default_hashes[name] == digest, name


def test_a_build_leaves_the_random_state_alone(tmp_path: Path) -> None:
    """A run that builds the embedded default on first use must draw the same numbers as one that finds it built."""
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    ensure_embedded(tmp_path / "build", sizes=SMALL)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


def test_a_complete_build_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "v1"
    ensure_embedded(root, sizes=SMALL)
    builds = _count_builds(monkeypatch)
    assert ensure_embedded(root, sizes=SMALL) == EmbeddedAssets.at(root)
    assert builds == []
    ensure_embedded(root, sizes=SMALL, force=True)
    ensure_embedded(root, sizes=SMALL, seed=7)  # a different build is asked for: rebuilt
    assert len(builds) == 2
    assert EmbeddedAssets.at(root).manifest()["seed"] == 7


def test_concurrent_callers_share_one_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "v1"
    builds = _count_builds(monkeypatch)
    results: list[EmbeddedAssets] = []
    # flock locks belong to open file descriptions, so threads exclude each other as processes do.
    threads = [threading.Thread(target=lambda: results.append(ensure_embedded(root, sizes=SMALL))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert results == [EmbeddedAssets.at(root)] * 3


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(build_module, "write_warmup", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_embedded(tmp_path / "v1", sizes=SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.lock"]


def test_leftovers_of_a_killed_build_are_replaced(tmp_path: Path) -> None:
    root = tmp_path / "v1"
    stale = tmp_path / ".v1.building-12345"
    (stale / "policy").mkdir(parents=True)
    (root / "data").mkdir(parents=True)  # an incomplete folder: no manifest
    assets = ensure_embedded(root, sizes=SMALL)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1", "v1.lock"]
    assert assets.manifest()["sizes"] == {"align": 8, "rl": 8, "sft": 16, "test": 8, "val": 8, "warmup": 8}


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path))
    assert default_root() == tmp_path / "embedded" / "v1"
    monkeypatch.delenv("PRISM_CACHE")
    repo = Path(build_module.__file__).resolve().parents[3]
    assert default_root() == repo / ".cache" / "embedded" / "v1"


def test_command_line_reports_an_existing_build(
    assets: EmbeddedAssets, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    builds = _count_builds(monkeypatch)
    tool = Path(build_module.__file__).resolve().parents[3] / "tools" / "build_embedded.py"
    monkeypatch.setattr(sys, "argv", [str(tool), "--out", str(assets.root)])
    runpy.run_path(str(tool), run_name="__main__")
    assert builds == []
    out = capsys.readouterr().out
    assert f"embedded default v1 at {assets.root}" in out
    assert f"policy_path            {assets.policy_path}" in out
    assert json.loads(assets.manifest_path.read_text())["vocab_size"] == 640
