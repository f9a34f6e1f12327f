"""Shared by the rollout tests: prompts from the embedded default, a teacher-forced log-prob reference, weight
perturbations, and the project's SGLang-protocol server as a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from prism_mcore.data.embedded import EmbeddedAssets, load_tokenizer
from prism_mcore.data.images import ImageConfig, build_image_processor, load_image_processor
from prism_mcore.data.readers import open_prompts
from prism_mcore.data.samples import LengthLimits, SampleBuilder
from prism_mcore.record import Sample

SERVER_START_TIMEOUT_S = 120.0
REPO_ROOT = Path(__file__).resolve().parents[1]

# SGLang's own classes validate our payloads where the sglang package can be imported: installed in the environment,
# or (keeping its ~20 extra packages out of it) in a folder named by PRISM_SGLANG_PATH, e.g.
# `pip install --no-deps --target /opt/sglang-site sglang==0.5.23 ...`; see sglang_schema_check.py.
SGLANG_PATH = os.environ.get("PRISM_SGLANG_PATH", "")
requires_sglang = pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None and not SGLANG_PATH,
    reason="sglang is not importable (pip install --no-deps sglang==0.5.23, or set PRISM_SGLANG_PATH)",
)


def sglang_schema_errors(items: list[dict[str, object]]) -> list[str | None]:
    """Run `tests.sglang_schema_check` on `items`; one error message (or None) per item."""
    python_path = os.pathsep.join(part for part in (SGLANG_PATH, os.environ.get("PYTHONPATH", "")) if part)
    result = subprocess.run(
        [sys.executable, "-m", "tests.sglang_schema_check"],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path},
    )
    if result.returncode != 0:
        raise RuntimeError(f"sglang_schema_check failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def rollout_prompts(assets: EmbeddedAssets, count: int = 3) -> list[Sample]:
    """`count` image prompts of the embedded RL split (images of different sizes), then one text-only prompt."""
    tokenizer = load_tokenizer(assets.processor_path)
    images = build_image_processor(load_image_processor(assets.processor_path), ImageConfig(backend="hf"))
    builder = SampleBuilder(tokenizer, images, LengthLimits())
    records = open_prompts(assets.rl_path, require_teacher=False)
    prompts = [builder.prompt_sample(records[index]) for index in range(count)]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three shapes."}], tokenize=False, add_generation_prompt=True
    )
    prompts.append(Sample(uid="text-only", prompt_ids=tokenizer(text)["input_ids"]))
    return prompts


@torch.no_grad()
def teacher_forced_logprobs(model: PreTrainedModel, sample: Sample, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) of each response token, from one transformers forward over prompt +
    response (no padding, no cache): the reference rollout log-probs must equal."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    if sample.image_inputs is not None:
        inputs["pixel_values"] = sample.image_inputs.pixel_values.to(model.dtype)
        inputs["image_grid_thw"] = sample.image_inputs.image_grid_thw
        inputs["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    logits = model(**inputs).logits[0, len(sample.prompt_ids) - 1 : -1].float().cpu()
    response = torch.tensor(sample.response_ids)
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, response[:, None]).squeeze(-1)


def perturbed_weights(model: PreTrainedModel, seed: int, scale: float = 0.05) -> list[tuple[str, torch.Tensor]]:
    """New values for the language model's weights (the vision tower left out, as a partial update may do)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (name, tensor + scale * torch.randn(tensor.shape, generator=generator))
        for name, tensor in model.state_dict().items()
        if name.startswith("model.language_model.layers.")
    ]


@dataclass
class ServerProcess:
    """A running `python -m prism_mcore.rollout.server`, its output going to `log_path`."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


def launch_server(model_path: Path, log_path: Path, port: int = 0, weight_version: str = "default") -> ServerProcess:
    """Start the server on 127.0.0.1 (one torch thread: the test machine's two cores are shared) and wait until it
    prints its address."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "prism_mcore.rollout.server", "--model-path", str(model_path)]
    command += ["--port", str(port), "--threads", "1", "--weight-version", weight_version]
    with log_path.open("wb") as log:  # a file, not a pipe: a full pipe would block the server
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://\S+)", log_path.read_text())
        if match:
            return ServerProcess(process, match.group(1), log_path)
        if process.poll() is not None:
            raise RuntimeError(f"the rollout server exited with code {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"the rollout server did not start within {SERVER_START_TIMEOUT_S} s")


@contextmanager
def running_server(model_path: Path, log_path: Path, weight_version: str = "default") -> Iterator[ServerProcess]:
    server = launch_server(model_path, log_path, weight_version=weight_version)
    try:
        yield server
    finally:
        server.kill()
