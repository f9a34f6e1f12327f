"""SGLangEngine over real HTTP against the project's SGLang-protocol server, run as subprocesses on the embedded
policy: completions equal LocalEngine's, images travel as data URIs, weight sync from disk and from tensors, the
0.5.23 session rules, memory release, and faults (a server killed mid-batch, a restarted server with stale
weights, no server at all)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from prism_mcore.config.schema import RolloutConfig
from prism_mcore.data.embedded import EmbeddedAssets
from prism_mcore.hf_checkpoint import write_hf_checkpoint
from prism_mcore.record import Sample
from prism_mcore.rollout import (
    DiskWeightSync,
    DistributedWeightSync,
    LocalEngine,
    RetryPolicy,
    RolloutError,
    SamplingParams,
    SGLangEngine,
    TensorWeightSync,
    WeightSync,
    build_rollout_engine,
)
from prism_mcore.rollout.protocol import image_data_uri, serialize_named_tensors
from tests.rollout_support import (
    ServerProcess,
    launch_server,
    perturbed_weights,
    requires_sglang,
    running_server,
    sglang_schema_errors,
    teacher_forced_logprobs,
)
from tests.torchrun import free_port

PARAMS = SamplingParams(n=2, temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=24, seed=100)
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def server(embedded: EmbeddedAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose weights stay those of the checkpoint (tests that change them start their own)."""
    with running_server(embedded.policy_path, tmp_path_factory.mktemp("server") / "server.log") as process:
        yield process


def _engine(urls: list[str], weight_sync: WeightSync | None = None, **options: object) -> SGLangEngine:
    engine = SGLangEngine(urls, weight_sync=weight_sync or TensorWeightSync(), request_timeout_s=60.0, **options)
    engine.wait_until_ready(timeout_s=60.0, poll_s=0.2)
    return engine


def _local_reference(local: LocalEngine, prompts: list[Sample], params: SamplingParams) -> list[Sample]:
    """What the server must answer: the client seeds completion k of the batch with `seed + k`, and the server
    generates each request alone."""
    reference = []
    for index, prompt in enumerate(prompts):
        for copy in range(params.n):
            seed = params.seed + index * params.n + copy
            reference += local.generate([prompt], dataclasses.replace(params, n=1, seed=seed))
    return reference


def _assert_same_completions(samples: list[Sample], reference: list[Sample]) -> None:
    assert [s.response_ids for s in samples] == [r.response_ids for r in reference]
    assert [s.finish_reason for s in samples] == [r.finish_reason for r in reference]
    error = max(
        (torch.tensor(s.rollout_logprobs) - torch.tensor(r.rollout_logprobs)).abs().max().item()
        for s, r in zip(samples, reference, strict=True)
    )
    assert error <= LOGPROB_TOLERANCE


def test_completions_equal_local_engine_and_teacher_forcing(
    server: ServerProcess, embedded: EmbeddedAssets, prompts: list[Sample]
) -> None:
    engine = _engine([server.url])
    samples = engine.generate(prompts, PARAMS)
    engine.close()
    local = LocalEngine.from_pretrained(embedded.policy_path)
    assert all(s.weight_version == 0 for s in samples)
    _assert_same_completions(samples, _local_reference(local, prompts, PARAMS))
    for sample in samples:
        recomputed = teacher_forced_logprobs(local.model, sample, PARAMS.temperature)
        assert (recomputed - torch.tensor(sample.rollout_logprobs)).abs().max().item() <= LOGPROB_TOLERANCE


def _unexpanded(sample: Sample, image_token_id: int) -> list[int]:
    """The prompt with one `<|image_pad|>` per image, as a client holding only text would send it."""
    return [t for i, t in enumerate(sample.prompt_ids) if t != image_token_id or sample.prompt_ids[i - 1] != t]


def test_batches_n_and_image_blocks_as_sglang_normalises_them(
    server: ServerProcess, embedded: EmbeddedAssets, prompts: list[Sample]
) -> None:
    image_token = LocalEngine.from_pretrained(embedded.policy_path).image_token_id
    image_prompts = prompts[:2]
    body = {
        "input_ids": [_unexpanded(p, image_token) for p in image_prompts],
        "image_data": [image_data_uri(p.images[0]) for p in image_prompts],
        "sampling_params": {"max_new_tokens": 5, "n": 2, "temperature": 0.0},
        "return_logprob": True,
    }
    answers = requests.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert len(answers) == 4  # prompt-major: both samples of prompt 0, then of prompt 1
    assert [a["meta_info"]["prompt_tokens"] for a in answers] == [
        len(p.prompt_ids) for p in image_prompts for _ in "ab"
    ]
    assert answers[0]["output_ids"] == answers[1]["output_ids"]  # greedy: the n samples agree
    assert all(len(a["meta_info"]["output_token_logprobs"]) == len(a["output_ids"]) == 5 for a in answers)

    refusals = {
        "unknown sampling key": {"input_ids": [1, 2], "sampling_params": {"min_p": 0.1}},
        "images without blocks": {"input_ids": [1, 2], "image_data": image_data_uri(prompts[0].images[0])},
        "text prompt": {"text": "hello"},
    }
    for reason, refused in refusals.items():
        response = requests.post(f"{server.url}/generate", json=refused, timeout=60)
        assert response.status_code == 400 and "message" in response.json()["error"], reason
    assert requests.get(f"{server.url}/no_such_route", timeout=60).status_code == 404


@requires_sglang
def test_server_answers_pass_sglang_response_schema(server: ServerProcess, prompts: list[Sample]) -> None:
    single = {"input_ids": prompts[0].prompt_ids, "image_data": [image_data_uri(prompts[0].images[0])]}
    batch = {"input_ids": [prompts[-1].prompt_ids] * 2, "sampling_params": {"max_new_tokens": 3}}
    items = []
    for body in (single, batch):
        body = {**body, "return_logprob": True, "sampling_params": body.get("sampling_params", {"max_new_tokens": 4})}
        answer = requests.post(f"{server.url}/generate", json=body, timeout=60).json()
        items += [{"endpoint": "/generate", "request": body}, {"endpoint": "/generate", "response": answer}]
    assert sglang_schema_errors(items) == [None] * len(items)


def test_memory_release_and_resume(server: ServerProcess, prompts: list[Sample]) -> None:
    engine = _engine([server.url], retry=RetryPolicy(max_retries=0))
    engine.release_memory()
    try:
        assert requests.get(f"{server.url}/health_generate", timeout=60).status_code == 503
        with pytest.raises(RolloutError, match="memory occupation is released"):
            engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))
    finally:
        engine.resume_memory()
    assert len(engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))) == 1
    engine.close()


def test_requests_the_client_must_fix_are_refused_with_400(server: ServerProcess, embedded: EmbeddedAssets) -> None:
    """400, not 500: the client retries a 500 on every server; a bad request would fail everywhere."""
    config = LocalEngine.from_pretrained(embedded.policy_path).model.config
    bad = {
        "out of vocabulary": {"input_ids": [1, 2, 10**6]},
        "negative id": {"input_ids": [1, -3]},
        "stop ids as a string": {"input_ids": [1, 2], "sampling_params": {"stop_token_ids": "12"}},
        "image tokens without an image block": {"input_ids": [1, config.image_token_id, 2]},
    }
    for case, body in bad.items():
        answer = requests.post(f"{server.url}/generate", json=body, timeout=60)
        assert answer.status_code == 400, (case, answer.status_code, answer.text)
        assert answer.json()["error"]["message"], case


def test_a_weight_load_that_fails_part_way_is_never_served_as_the_old_version(
    embedded: EmbeddedAssets, tmp_path: Path
) -> None:
    model = LocalEngine.from_pretrained(embedded.policy_path).model
    (good_name, good), *_ = perturbed_weights(model, seed=5)
    bad = [("model.language_model.norm.weight", torch.ones(3)), (good_name, good)]  # a wrong shape among them
    folder = write_hf_checkpoint(iter(bad), tmp_path / "bad", embedded.policy_path)
    with running_server(embedded.policy_path, tmp_path / "server.log") as server:
        body = {"model_path": str(folder), "weight_version": "7"}
        answer = requests.post(f"{server.url}/update_weights_from_disk", json=body, timeout=60)
        info = requests.get(f"{server.url}/model_info", timeout=60).json()
    assert answer.status_code == 400 and "shape" in answer.json()["message"]
    assert info["weight_version"] == "incomplete-update"


def test_weight_updates_need_an_open_session(server: ServerProcess) -> None:
    update = {"serialized_named_tensors": [serialize_named_tensors([("lm_head.weight", torch.zeros(1))])]}
    outside = requests.post(f"{server.url}/update_weights_from_tensor", json=update, timeout=60)
    assert outside.status_code == 400 and outside.json() == {
        "success": False,
        "message": "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()",
    }
    assert requests.post(f"{server.url}/begin_weight_update", json={}, timeout=60).status_code == 200
    try:
        again = requests.post(f"{server.url}/begin_weight_update", json={}, timeout=60)
        assert again.status_code == 400 and "already open" in again.json()["message"]
    finally:
        assert requests.post(f"{server.url}/end_weight_update", json={}, timeout=60).status_code == 200
    closed = requests.post(f"{server.url}/end_weight_update", json={}, timeout=60)
    assert closed.status_code == 400 and "no weight-update session is open" in closed.json()["message"]


@pytest.mark.parametrize("transport", ["disk", "tensor", "distributed"])
def test_weight_sync_changes_what_the_server_samples(
    transport: str, embedded: EmbeddedAssets, prompts: list[Sample], tmp_path: Path
) -> None:
    local = LocalEngine.from_pretrained(embedded.policy_path)
    new_weights = dict(local.model.state_dict())
    new_weights.update(perturbed_weights(local.model, seed=7))
    weight_sync = {
        "disk": lambda: DiskWeightSync(directory=tmp_path / "sync", base_checkpoint=embedded.policy_path),
        "tensor": lambda: TensorWeightSync(bucket_bytes=2 * 1024**2),  # several buckets
        # The NCCL transport's protocol over gloo: the CPU server joins gloo groups.
        "distributed": lambda: DistributedWeightSync(
            master_address="127.0.0.1", master_port=free_port(), backend="gloo", bucket_bytes=2 * 1024**2
        ),
    }[transport]()
    with running_server(embedded.policy_path, tmp_path / "server.log") as server:
        engine = _engine([server.url], weight_sync)
        before = engine.generate(prompts, PARAMS)
        engine.update_weights(iter(new_weights.items()), version=1)
        info = requests.get(f"{server.url}/model_info", timeout=60).json()
        after = engine.generate(prompts, PARAMS)
        engine.close()
    assert info["weight_version"] == "1"
    if transport == "disk":
        assert info["model_path"] == str((tmp_path / "sync" / "weights_v1").resolve())
    local.update_weights(iter(new_weights.items()), version=1)
    assert all(s.weight_version == 1 for s in after)
    assert [s.response_ids for s in after] != [s.response_ids for s in before]
    _assert_same_completions(after, _local_reference(local, prompts, PARAMS))


def test_an_engine_brings_its_servers_to_the_checkpoint_it_serves(
    embedded: EmbeddedAssets, prompts: list[Sample], tmp_path: Path
) -> None:
    """Servers started from the run's first checkpoint sample from a later stage's once that stage builds its
    engine: `build_rollout_engine` pushes the checkpoint through the weight sync."""
    weights = dict(LocalEngine.from_pretrained(embedded.policy_path).model.state_dict())
    weights.update(perturbed_weights(LocalEngine.from_pretrained(embedded.policy_path).model, seed=11))
    stage = write_hf_checkpoint(((n, t.clone()) for n, t in weights.items()), tmp_path / "stage", embedded.policy_path)
    config = RolloutConfig(engine="sglang", request_timeout_s=60.0, server_ready_timeout_s=60.0, weight_sync="tensor")
    with running_server(embedded.policy_path, tmp_path / "server.log") as server:
        config.server_urls = [server.url]
        engine = build_rollout_engine(config, stage, run_dir=tmp_path, weight_version=3)
        samples = engine.generate(prompts, PARAMS)
        engine.close()
    assert all(s.weight_version == 3 for s in samples)
    _assert_same_completions(samples, _local_reference(LocalEngine.from_pretrained(stage), prompts, PARAMS))


@pytest.mark.slow
def test_faults_killed_restarted_and_missing_servers(
    embedded: EmbeddedAssets, prompts: list[Sample], tmp_path: Path
) -> None:
    local = LocalEngine.from_pretrained(embedded.policy_path)
    new_weights = perturbed_weights(local.model, seed=9)
    local.update_weights(iter(new_weights), version=1)
    params = SamplingParams(n=8, max_new_tokens=48, seed=300)
    victim = launch_server(embedded.policy_path, tmp_path / "victim.log")
    survivor = launch_server(embedded.policy_path, tmp_path / "survivor.log")
    engine = _engine([victim.url, survivor.url], retry=RetryPolicy(max_retries=4, backoff_s=0.5))
    try:
        engine.update_weights(iter(new_weights), version=1)

        # 1. The victim dies while it has requests of the batch in flight: they finish on the survivor.
        def kill_when_busy() -> None:
            deadline = time.monotonic() + 60.0
            while engine.endpoints[0].outstanding == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            victim.kill()

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        samples = engine.generate(prompts, params)
        killer.join()
        assert victim.process.poll() is not None and engine.endpoints[0].consecutive_failures > 0
        _assert_same_completions(samples, _local_reference(local, prompts, params))

        # 2. It comes back on its port with the checkpoint's weights (version "default"): its answers are stale,
        # so they are redone on the survivor and it is set aside until the next sync.
        port = int(victim.url.rsplit(":", 1)[1])
        victim = launch_server(embedded.policy_path, tmp_path / "victim-restarted.log", port=port)
        # Let the cool-down its failures earned run out, so that the engine asks it again.
        time.sleep(max(0.0, engine.endpoints[0].available_at - time.monotonic()))
        samples = engine.generate(prompts, params)
        assert all(s.weight_version == 1 for s in samples)
        _assert_same_completions(samples, _local_reference(local, prompts, params))
        assert engine.endpoints[0].stale_version == "default"

        # 3. The next sync reaches it again.
        engine.update_weights(iter(new_weights), version=2)
        assert requests.get(f"{victim.url}/model_info", timeout=60).json()["weight_version"] == "2"
        assert all(s.weight_version == 2 for s in engine.generate(prompts[:1], SamplingParams(n=4)))

        # 4. No server at all: a clear error once the attempts are spent.
        victim.kill()
        survivor.kill()
        engine.retry = RetryPolicy(max_retries=1, backoff_s=0.1)
        with pytest.raises(RolloutError, match=r"no completion for sample .* after 2 attempts: .*connection failed"):
            engine.generate(prompts[:1], SamplingParams())
    finally:
        engine.close()
        victim.kill()
        survivor.kill()


def test_a_server_dead_during_a_weight_sync_leaves_rotation_and_returns_with_the_weights(
    embedded: EmbeddedAssets, prompts: list[Sample], tmp_path: Path
) -> None:
    """Two project servers, one killed: the sync reaches the survivor, generation continues there; the killed one,
    restarted with the checkpoint's weights, stays out until the next sync pushes the current weights to it."""
    local = LocalEngine.from_pretrained(embedded.policy_path)
    new_weights = perturbed_weights(local.model, seed=13)
    local.update_weights(iter(new_weights), version=1)
    params = SamplingParams(n=2, max_new_tokens=8, seed=500)
    victim = launch_server(embedded.policy_path, tmp_path / "victim.log")
    survivor = launch_server(embedded.policy_path, tmp_path / "survivor.log")
    engine = _engine([victim.url, survivor.url], retry=RetryPolicy(max_retries=2, backoff_s=0.1))
    try:
        victim.kill()
        engine.update_weights(iter(new_weights), version=1)
        assert [e.in_rotation for e in engine.endpoints] == [False, True]
        samples = engine.generate(prompts[:2], params)
        assert all(s.weight_version == 1 for s in samples)
        assert engine.endpoints[0].consecutive_failures == 0  # never asked while out of rotation
        _assert_same_completions(samples, _local_reference(local, prompts[:2], params))

        # Back on its port with the checkpoint's weights: it answers, but not with version 1, so it stays out.
        port = int(victim.url.rsplit(":", 1)[1])
        victim = launch_server(embedded.policy_path, tmp_path / "victim-restarted.log", port=port)
        engine.endpoints[0].next_probe_at = 0.0  # probe now rather than after REPROBE_S
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))
        assert not engine.endpoints[0].in_rotation

        # The next sync pushes the current weights to it first, then it serves: alone, once the survivor is gone.
        engine.update_weights(iter(new_weights), version=2)
        assert requests.get(f"{victim.url}/model_info", timeout=60).json()["weight_version"] == "2"
        assert [e.in_rotation for e in engine.endpoints] == [True, True]
        survivor.kill()
        samples = engine.generate(prompts[:2], params)
        assert all(s.weight_version == 2 for s in samples)
        _assert_same_completions(samples, _local_reference(local, prompts[:2], params))
    finally:
        engine.close()
        victim.kill()
        survivor.kill()
