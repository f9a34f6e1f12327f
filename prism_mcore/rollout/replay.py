"""Rollout dump and replay: train from recorded completions without generating (`rollout.dump_dir`,
`rollout.replay_dir`).

Two wrappers behind the `RolloutEngine` interface, so no stage knows about either:
- `DumpingEngine` passes every call to the real engine and writes each `generate` call's completions to one file;
- `ReplayEngine` serves `generate` from those files and generates nothing (it loads no model and takes the weight
  updates only to follow their version).
A replayed run recomputes everything downstream of the engine (segments, rewards, discriminator scores, advantages,
updates) from the recorded tokens, so with the same config, data and seed it reproduces the dumped run's metrics bit
for bit: a rollout-side change can be separated from a training-side one, and a training change can be tried on a
fixed batch. Scores are recomputed rather than stored: they depend on the trainer (D), which a replay may change.

One file per call, `<dir>/<stage>/v<weight version>_<key>.json`, written atomically. The key is a digest of what the
call asked for (the prompts' uids and token ids, the sampling parameters, the weight version), so a resumed run, the
validation calls and the training rollouts all find their own file whatever order they come in. The file is JSON:

    {"format": "prism_mcore.rollout_dump", "version": 1, "weight_version": 3,
     "params": {SamplingParams fields}, "prompts": [uid, ...],
     "samples": [{"uid", "response_ids", "rollout_logprobs", "finish_reason", "weight_version"}, ...]}

with the `n` samples of each prompt adjacent, in prompt order. JSON floats round-trip exactly, so the log-probs are
the engine's to the last bit. A file that is malformed or does not match the call is refused with one line naming
the file and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from prism_mcore.files import write_text_atomic
from prism_mcore.record import Sample
from prism_mcore.rollout.base import RolloutEngine, RolloutError, SamplingParams, completed_sample

DUMP_FORMAT = "prism_mcore.rollout_dump"
DUMP_VERSION = 1
FINISH_REASONS = ("stop", "length")


class ReplayError(RolloutError):
    """A dump file is missing, malformed, or does not match the call that replays it."""


def _params_record(params: SamplingParams) -> dict[str, Any]:
    record = dataclasses.asdict(params)
    record["stop_token_ids"] = list(record["stop_token_ids"])
    return record


def call_key(prompts: Sequence[Sample], params: SamplingParams, weight_version: int) -> str:
    """A digest of what a `generate` call asks for (prompts, sampling parameters, weight version)."""
    request = {
        "weight_version": weight_version,
        "params": _params_record(params),
        "prompts": [[prompt.uid, list(prompt.prompt_ids)] for prompt in prompts],
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def dump_path(directory: Path, prompts: Sequence[Sample], params: SamplingParams, weight_version: int) -> Path:
    return directory / f"v{weight_version:06d}_{call_key(prompts, params, weight_version)}.json"


def write_dump(
    path: Path, samples: Sequence[Sample], prompts: Sequence[Sample], params: SamplingParams, weight_version: int
) -> None:
    """One call's completions, atomically (a run killed while writing leaves no partial file)."""
    record = {
        "format": DUMP_FORMAT,
        "version": DUMP_VERSION,
        "weight_version": weight_version,
        "params": _params_record(params),
        "prompts": [prompt.uid for prompt in prompts],
        "samples": [
            {
                "uid": sample.uid,
                "response_ids": sample.response_ids,
                "rollout_logprobs": sample.rollout_logprobs,
                "finish_reason": sample.finish_reason,
                "weight_version": sample.weight_version,
            }
            for sample in samples
        ],
    }
    write_text_atomic(path, json.dumps(record))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_dump(path: Path, prompts: Sequence[Sample], params: SamplingParams, weight_version: int) -> list[Sample]:
    """The completions `path` recorded for this call, checked field by field against the call."""

    def refuse(field: str, problem: str) -> ReplayError:
        return ReplayError(f"{path}: field {field!r}: {problem}")

    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReplayError(f"{path}: not a readable rollout dump ({error})") from None
    if not isinstance(record, dict):
        raise refuse("format", f"expected a JSON object, got {type(record).__name__}")
    if record.get("format") != DUMP_FORMAT:
        raise refuse("format", f"expected {DUMP_FORMAT!r}, got {record.get('format')!r}")
    if record.get("version") != DUMP_VERSION:
        raise refuse("version", f"this trainer reads version {DUMP_VERSION}, got {record.get('version')!r}")
    if record.get("weight_version") != weight_version:
        raise refuse("weight_version", f"the call is at {weight_version}, the dump at {record.get('weight_version')!r}")
    if record.get("params") != _params_record(params):
        raise refuse("params", f"the call samples with {_params_record(params)}, the dump with {record.get('params')}")
    uids = [prompt.uid for prompt in prompts]
    if record.get("prompts") != uids:
        raise refuse("prompts", f"the call asks for {uids}, the dump holds {record.get('prompts')}")
    entries = record.get("samples")
    if not isinstance(entries, list) or len(entries) != len(prompts) * params.n:
        count = len(entries) if isinstance(entries, list) else entries
        raise refuse("samples", f"expected {len(prompts)} prompts x n={params.n} entries, got {count}")
    samples = []
    for index, entry in enumerate(entries):
        prompt = prompts[index // params.n]
        at = f"samples[{index}]"
        if not isinstance(entry, dict):
            raise refuse(at, f"expected an object, got {type(entry).__name__}")
        if entry.get("uid") != prompt.uid:
            raise refuse(f"{at}.uid", f"expected {prompt.uid!r} (prompt order), got {entry.get('uid')!r}")
        response_ids, logprobs = entry.get("response_ids"), entry.get("rollout_logprobs")
        if not isinstance(response_ids, list) or not all(_is_int(token) for token in response_ids):
            raise refuse(f"{at}.response_ids", "expected a list of token ids")
        if not isinstance(logprobs, list) or not all(isinstance(v, float | int) for v in logprobs):
            raise refuse(f"{at}.rollout_logprobs", "expected a list of numbers")
        if len(logprobs) != len(response_ids):
            raise refuse(f"{at}.rollout_logprobs", f"{len(logprobs)} values for {len(response_ids)} response tokens")
        if entry.get("finish_reason") not in FINISH_REASONS:
            raise refuse(f"{at}.finish_reason", f"expected one of {FINISH_REASONS}, got {entry.get('finish_reason')!r}")
        if not _is_int(entry.get("weight_version")):
            raise refuse(f"{at}.weight_version", f"expected an integer, got {entry.get('weight_version')!r}")
        samples.append(
            completed_sample(prompt, response_ids, logprobs, entry["finish_reason"], entry["weight_version"])
        )
    return samples


class DumpingEngine(RolloutEngine):
    """`engine`, with each `generate` call's completions also written under `directory`."""

    def __init__(self, engine: RolloutEngine, directory: str | Path) -> None:
        self.engine = engine
        self.directory = Path(directory)

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def generate(self, prompts: Sequence[Sample], params: SamplingParams) -> list[Sample]:
        version = self.engine.weight_version
        samples = self.engine.generate(prompts, params)
        write_dump(dump_path(self.directory, prompts, params, version), samples, prompts, params, version)
        return samples

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.engine.update_weights(named_tensors, version)

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self) -> None:
        self.engine.resume_memory()

    def close(self) -> None:
        self.engine.close()


class ReplayEngine(RolloutEngine):
    """Completions read from a `DumpingEngine`'s folder; nothing is generated."""

    def __init__(self, directory: str | Path, weight_version: int = 0) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ReplayError(f"rollout.replay_dir: {self.directory} is not a folder of rollout dumps")
        self._weight_version = weight_version

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def generate(self, prompts: Sequence[Sample], params: SamplingParams) -> list[Sample]:
        path = dump_path(self.directory, prompts, params, self._weight_version)
        if not path.is_file():
            versions = sorted({file.name.split("_")[0] for file in self.directory.glob("v*_*.json")})
            raise ReplayError(
                f"{path}: no dump of this call ({len(prompts)} prompts from {prompts[0].uid!r} at weight version "
                f"{self._weight_version}, n={params.n}, seed {params.seed}; the folder holds "
                f"{', '.join(versions) or 'no dumps'}): replay with the config and data the dump was made with"
            )
        return read_dump(path, prompts, params, self._weight_version)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        for _ in named_tensors:  # the exporter is collective: its stream is drained, never loaded
            pass
        self._weight_version = version

    def release_memory(self) -> None:
        pass

    def resume_memory(self) -> None:
        pass

    def close(self) -> None:
        pass
