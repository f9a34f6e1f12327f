"""Rollout dump and replay (`rollout/replay.py`): a dumped call is served back field for field without generating,
each call finds its own file, and a dump that is missing, malformed or made for another call is refused with one
line naming the file and the field."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
import torch

from prism_mcore.config.schema import RolloutConfig
from prism_mcore.record import Sample
from prism_mcore.rollout import DumpingEngine, ReplayEngine, ReplayError, SamplingParams, build_rollout_engine
from prism_mcore.rollout.base import RolloutEngine, completed_sample


class CountingEngine(RolloutEngine):
    """Completions that depend on the prompt, the sample's index and the weight version; counts calls and memory
    hooks, and refuses to generate twice for the same version (a replay must not reach it)."""

    def __init__(self) -> None:
        self.version, self.calls, self.hooks = 0, 0, []

    @property
    def weight_version(self) -> int:
        return self.version

    def generate(self, prompts: Sequence[Sample], params: SamplingParams) -> list[Sample]:
        self.calls += 1
        samples = []
        for prompt in prompts:
            for i in range(params.n):
                ids = [prompt.prompt_ids[0] + i, 7 + self.version]
                logprobs = [-0.1 * (i + 1) / 3, -1e-7 * self.version - 2.0 / 7]  # floats that print long
                samples.append(completed_sample(prompt, ids, logprobs, "stop" if i else "length", self.version))
        return samples

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.hooks.append(("update", len(list(named_tensors)), version))
        self.version = version

    def release_memory(self) -> None:
        self.hooks.append("release")

    def resume_memory(self) -> None:
        self.hooks.append("resume")

    def close(self) -> None:
        self.hooks.append("close")


PROMPTS = [Sample(uid="a", prompt_ids=[3, 4]), Sample(uid="b", prompt_ids=[5])]
PARAMS = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=11)


def _fields(samples: list[Sample]) -> list[tuple]:
    return [(s.uid, s.response_ids, s.rollout_logprobs, s.finish_reason, s.weight_version) for s in samples]


def _dumped(tmp_path: Path) -> tuple[list[Sample], list[Sample], CountingEngine]:
    """Two calls, before and after a weight update, through a dumping engine."""
    inner = CountingEngine()
    engine = DumpingEngine(inner, tmp_path / "dump")
    first = engine.generate(PROMPTS, PARAMS)
    engine.release_memory()
    engine.resume_memory()
    engine.update_weights([("w", torch.zeros(1))], version=1)
    second = engine.generate(PROMPTS[:1], PARAMS)
    engine.close()
    assert inner.hooks == ["release", "resume", ("update", 1, 1), "close"]  # passed through
    return first, second, inner


def test_a_replay_serves_the_dumped_calls_bit_for_bit_without_generating(tmp_path: Path) -> None:
    first, second, inner = _dumped(tmp_path)
    files = sorted(path.name for path in (tmp_path / "dump").iterdir())
    assert len(files) == 2 and files[0].startswith("v000000_") and files[1].startswith("v000001_")
    record = json.loads((tmp_path / "dump" / files[0]).read_text())
    assert (record["format"], record["version"], record["weight_version"]) == ("prism_mcore.rollout_dump", 1, 0)
    assert record["prompts"] == ["a", "b"] and len(record["samples"]) == 4

    replay = ReplayEngine(tmp_path / "dump")
    # Out of order and repeated: each call finds its own file by what it asks for.
    replay.update_weights(iter([("w", torch.zeros(1))]), version=1)
    assert _fields(replay.generate(PROMPTS[:1], PARAMS)) == _fields(second)
    replay.update_weights(iter([]), version=0)
    again = replay.generate(PROMPTS, PARAMS)
    assert _fields(again) == _fields(first)
    assert again[1].rollout_logprobs[0] == -0.1 * 2 / 3  # exact, not rounded by the file
    assert again[0].prompt_ids is PROMPTS[0].prompt_ids  # the prompt's own fields, completed as an engine does
    assert inner.calls == 2  # the replay generated nothing


def test_a_call_that_was_not_dumped_is_refused_naming_it(tmp_path: Path) -> None:
    _dumped(tmp_path)
    replay = ReplayEngine(tmp_path / "dump")
    with pytest.raises(
        ReplayError, match=r"no dump of this call \(2 prompts from 'a' at weight version 0, n=2, seed 12"
    ):
        replay.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=12))
    with pytest.raises(ReplayError, match="the folder holds v000000, v000001"):
        replay.generate([Sample(uid="a", prompt_ids=[3, 9]), PROMPTS[1]], PARAMS)  # other prompt tokens
    with pytest.raises(ReplayError, match="is not a folder of rollout dumps"):
        ReplayEngine(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("edit", "field", "problem"),
    [
        (lambda r: r.update(version=2), "version", "this trainer reads version 1, got 2"),
        (lambda r: r.update(format="other"), "format", "expected 'prism_mcore.rollout_dump', got 'other'"),
        (lambda r: r.update(weight_version=5), "weight_version", "the call is at 0, the dump at 5"),
        (lambda r: r.update(prompts=["b", "a"]), "prompts", "the call asks for ['a', 'b']"),
        (lambda r: r["params"].update(seed=3), "params", "the call samples with"),
        (lambda r: r["samples"].pop(), "samples", "expected 2 prompts x n=2 entries, got 3"),
        (lambda r: r["samples"][2].update(uid="a"), "samples[2].uid", "expected 'b' (prompt order), got 'a'"),
        (lambda r: r["samples"][1].update(response_ids=[1, "x"]), "samples[1].response_ids", "a list of token ids"),
        (lambda r: r["samples"][0]["rollout_logprobs"].pop(), "samples[0].rollout_logprobs", "1 values for 2"),
        (lambda r: r["samples"][3].update(finish_reason="abort"), "samples[3].finish_reason", "got 'abort'"),
        (lambda r: r["samples"][3].pop("weight_version"), "samples[3].weight_version", "an integer, got None"),
    ],
)
def test_a_bad_dump_file_is_refused_naming_the_file_and_field(tmp_path: Path, edit, field: str, problem: str) -> None:
    _dumped(tmp_path)
    path = next((tmp_path / "dump").glob("v000000_*.json"))
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    with pytest.raises(ReplayError) as refused:
        ReplayEngine(tmp_path / "dump").generate(PROMPTS, PARAMS)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: field '{field}': ")
    assert problem in message


def test_a_truncated_dump_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    _dumped(tmp_path)
    path = next((tmp_path / "dump").glob("v000000_*.json"))
    path.write_text(path.read_text()[:50])
    with pytest.raises(ReplayError, match=f"^{path}: not a readable rollout dump"):
        ReplayEngine(tmp_path / "dump").generate(PROMPTS, PARAMS)


def test_the_config_picks_the_wrapper_per_stage(tmp_path: Path) -> None:
    (tmp_path / "dump" / "rlvr").mkdir(parents=True)
    replay = build_rollout_engine(
        RolloutConfig(replay_dir=str(tmp_path / "dump")), "/no/checkpoint", run_dir=tmp_path, stage="rlvr"
    )
    assert isinstance(replay, ReplayEngine) and replay.directory == tmp_path / "dump" / "rlvr"  # no model loaded


def test_dumping_and_replaying_at_once_is_refused() -> None:
    from prism_mcore.config import ConfigError, apply_overrides, load_recipe
    from prism_mcore.config.schema import check_ranges

    config = apply_overrides(load_recipe("embedded"), ["rollout.dump_dir=a", "rollout.replay_dir=b"])
    with pytest.raises(ConfigError, match="^rollout.dump_dir and rollout.replay_dir are both set"):
        check_ranges(config)
