"""SGLangEngine against scripted SGLang stand-ins: payloads, load balancing, and every fault it must survive or
report (unreachable and failing servers, timeouts, stale weight versions, aborts, vision tokens, 4xx, malformed
answers), plus readiness, weight updates and memory hooks."""

from __future__ import annotations

import dataclasses
import socket
import threading
from typing import Any

import pytest
import torch

from prism_mcore.record import Sample
from prism_mcore.rollout import RetryPolicy, RolloutError, SamplingParams, SGLangEngine, TensorWeightSync
from prism_mcore.rollout.endpoint import ServerRejected
from prism_mcore.rollout.protocol import ProtocolError
from tests.unit.rollout.fake_server import Answer, FakeServer, completion, fake_servers, sglang_like

VISION_TOKEN = 99
PROMPTS = [Sample(uid="a", prompt_ids=[1, 2, 3]), Sample(uid="b", prompt_ids=[4, 5], images=[b"\x89PNG\r\n\x1a\nxx"])]
FAST_RETRY = RetryPolicy(max_retries=2, backoff_s=0.05, max_backoff_s=0.2)


def _engine(urls: list[str], timeout_s: float = 5.0, retry: RetryPolicy = FAST_RETRY) -> SGLangEngine:
    return SGLangEngine(
        urls,
        weight_sync=TensorWeightSync(),
        request_timeout_s=timeout_s,
        retry=retry,
        max_concurrency=8,
        vision_token_ids=[VISION_TOKEN],
    )


def _unused_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the probe is closed


def _generates(server: FakeServer) -> int:
    return server.paths().count("/generate")


def slow_sglang(server: FakeServer, path: str, body: Any) -> Answer:
    answer = sglang_like(server, path, body)
    answer.delay_s = 0.05 if path == "/generate" else 0.0
    return answer


def test_completions_carry_sglang_answers_and_spread_over_servers() -> None:
    with fake_servers(slow_sglang, slow_sglang) as servers:
        engine = _engine([s.url for s in servers])
        samples = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=8, seed=10))
        engine.close()
    assert [s.uid for s in samples] == ["a"] * 4 + ["b"] * 4
    assert all(s.response_ids == [5, 6, 2] and s.rollout_logprobs == [-0.5] * 3 for s in samples)
    assert all(s.finish_reason == "stop" and s.weight_version == 0 for s in samples)
    assert all(_generates(server) >= 2 for server in servers)  # least-outstanding balancing uses both
    payloads = [body for server in servers for path, body in server.requests if path == "/generate"]
    assert sorted(p["sampling_params"]["sampling_seed"] for p in payloads) == list(range(10, 18))
    assert all(p["return_logprob"] is True and p["logprob_start_len"] == -1 for p in payloads)
    with_images = [p for p in payloads if p["input_ids"] == [4, 5]]
    assert len(with_images) == 4 and all(p["image_data"][0].startswith("data:image/png;base64,") for p in with_images)


def test_unreachable_and_failing_servers_are_routed_around() -> None:
    def failing(server: FakeServer, path: str, body: Any) -> Answer:
        return Answer(503, {"error": {"message": "overloaded"}})

    with fake_servers(failing, sglang_like) as (bad, good):
        # A cool-down longer than the test: a server that failed is not asked again.
        engine = _engine([_unused_url(), bad.url, good.url], retry=RetryPolicy(max_retries=2, backoff_s=30.0))
        samples = engine.generate(PROMPTS, SamplingParams(n=3))
        assert len(samples) == 6 and all(s.response_ids == [5, 6, 2] for s in samples)
        assert _generates(good) == 6 and _generates(bad) >= 1
        failed_requests = _generates(bad)
        engine.generate(PROMPTS, SamplingParams(n=3))
        assert _generates(good) == 12 and _generates(bad) == failed_requests
        engine.close()


def test_answers_cut_off_mid_body_are_retried_elsewhere() -> None:
    def dying(server: FakeServer, path: str, body: Any) -> Answer:
        answer = sglang_like(server, path, body)
        return dataclasses.replace(answer, cut_off=True) if path == "/generate" else answer

    with fake_servers(dying, sglang_like) as (bad, good):
        engine = _engine([bad.url, good.url], retry=RetryPolicy(max_retries=2, backoff_s=30.0))
        samples = engine.generate(PROMPTS, SamplingParams(n=3))
        engine.close()
    assert len(samples) == 6 and all(s.response_ids == [5, 6, 2] for s in samples)
    assert _generates(bad) >= 1 and _generates(good) == 6


def test_a_lone_server_that_comes_back_is_waited_for() -> None:
    failures_left = {"count": 2}

    def flaky(server: FakeServer, path: str, body: Any) -> Answer:
        with server.lock:
            failing = failures_left["count"] > 0
            failures_left["count"] -= 1
        return Answer(502, {"error": {"message": "restarting"}}) if failing else completion(server)

    with fake_servers(flaky) as (server,):
        engine = _engine([server.url])
        (sample,) = engine.generate(PROMPTS[:1], SamplingParams())
        engine.close()
    assert sample.response_ids == [5, 6, 2] and _generates(server) == 3


def test_stale_weight_versions_are_regenerated_elsewhere_and_the_server_set_aside() -> None:
    with fake_servers(sglang_like, sglang_like) as (stale, fresh):
        stale.weight_version = "7"
        engine = _engine([stale.url, fresh.url])
        samples = engine.generate(PROMPTS, SamplingParams(n=2))
        assert all(s.weight_version == 0 for s in samples) and len(samples) == 4
        assert engine.endpoints[0].stale_version == "7"
        stale_requests = _generates(stale)
        engine.generate(PROMPTS, SamplingParams(n=2))
        assert _generates(stale) == stale_requests  # no longer asked
        engine.close()


def test_no_server_with_the_expected_version_is_a_clear_error() -> None:
    with fake_servers(sglang_like) as (server,):
        server.weight_version = "default"
        engine = _engine([server.url])
        with pytest.raises(
            RolloutError, match=r"no server holds weight version '0' \(http://127.0.0.1:\d+ has 'default'\)"
        ):
            engine.generate(PROMPTS[:1], SamplingParams())
        engine.close()


def test_a_server_that_never_answers_in_time_fails_after_bounded_attempts() -> None:
    release = threading.Event()

    def hanging(server: FakeServer, path: str, body: Any) -> Answer:
        release.wait(5.0)
        return completion(server)

    with fake_servers(hanging) as (server,):
        engine = _engine([server.url], timeout_s=0.3, retry=RetryPolicy(max_retries=1, backoff_s=0.05))
        with pytest.raises(
            RolloutError, match=r"no completion for sample 'a' after 2 attempts: .*no answer within 0.3 s"
        ):
            engine.generate(PROMPTS[:1], SamplingParams())
        release.set()
        engine.close()
    assert _generates(server) == 2


def test_aborted_requests_and_vision_tokens_are_sampled_again() -> None:
    script = iter(["abort", "vision", "ok"])

    def scripted(server: FakeServer, path: str, body: Any) -> Answer:
        step = next(script)
        if step == "abort":
            answer = completion(server)
            answer.body["meta_info"]["finish_reason"] = {"type": "abort", "message": "weights are updating"}
            return answer
        return completion(server, [VISION_TOKEN, 2] if step == "vision" else [5, 2])

    with fake_servers(scripted) as (server,):
        engine = _engine([server.url])
        (sample,) = engine.generate(PROMPTS[:1], SamplingParams(seed=3))
        engine.close()
    assert sample.response_ids == [5, 2] and _generates(server) == 3
    seeds = [body["sampling_params"]["sampling_seed"] for path, body in server.requests if path == "/generate"]
    assert seeds[0] == seeds[1] != seeds[2]  # an aborted request is sent again as is; a rejected sample reseeded


def test_rejected_requests_fail_at_once() -> None:
    def rejecting(server: FakeServer, path: str, body: Any) -> Answer:
        return Answer(400, {"error": {"message": "unknown field `seed`"}})

    with fake_servers(rejecting) as (server,):
        engine = _engine([server.url])
        with pytest.raises(ServerRejected, match=r"/generate: HTTP 400 unknown field `seed`"):
            engine.generate(PROMPTS[:1], SamplingParams())
        engine.close()
    assert _generates(server) == 1


def test_malformed_answers_fail_naming_server_and_field() -> None:
    def malformed(server: FakeServer, path: str, body: Any) -> Answer:
        answer = completion(server)
        del answer.body["meta_info"]["output_token_logprobs"]
        return answer

    with fake_servers(malformed) as (server,):
        engine = _engine([server.url])
        with pytest.raises(ProtocolError, match=f"{server.url}: meta_info.output_token_logprobs is missing"):
            engine.generate(PROMPTS[:1], SamplingParams())
        engine.close()


def test_readiness_labels_the_servers_weights_with_the_engine_version() -> None:
    with fake_servers(sglang_like, sglang_like) as servers:
        servers[0].weight_version = "default"
        engine = _engine([s.url for s in servers])
        engine.wait_until_ready(timeout_s=5, poll_s=0.05)
        assert [s.weight_version for s in servers] == ["0", "0"]
        assert ("/update_weight_version", {"new_version": "0", "abort_all_requests": False}) in servers[0].requests
        assert "/update_weight_version" not in servers[1].paths()
        assert engine.server_health() == {s.url: True for s in servers}
        engine.close()
    unreachable = _engine([_unused_url()])
    with pytest.raises(RolloutError, match="not ready within 0.2 s"):
        unreachable.wait_until_ready(timeout_s=0.2, poll_s=0.05)
    unreachable.close()


def test_update_weights_syncs_flushes_and_readmits_stale_servers() -> None:
    with fake_servers(sglang_like, sglang_like) as servers:
        engine = _engine([s.url for s in servers])
        engine.endpoints[1].stale_version = "default"
        engine.update_weights(iter([("w", torch.ones(2))]), version=4)
        assert engine.weight_version == 4 and all(e.stale_version is None for e in engine.endpoints)
        for server in servers:
            assert server.paths() == [
                "/health",
                "/server_info",
                "/begin_weight_update",
                "/update_weights_from_tensor",
                "/end_weight_update",
                "/flush_cache",
            ]
            assert server.weight_version == "4"
        samples = engine.generate(PROMPTS[:1], SamplingParams(n=2))
        assert all(s.weight_version == 4 for s in samples)
        engine.release_memory()
        engine.resume_memory()
        assert servers[0].paths()[-2:] == ["/release_memory_occupation", "/resume_memory_occupation"]
        engine.close()


def test_a_dead_server_is_left_out_of_the_sync_and_out_of_rotation() -> None:
    """One of two servers is down at sync time: the other gets the weights, the sync succeeds, and generation never
    tries the dead one (no connection failures counted against it)."""
    with fake_servers(sglang_like) as (live,):
        engine = _engine([live.url, _unused_url()])
        engine.update_weights(iter([("w", torch.ones(2))]), version=4)
        assert live.weight_version == "4"
        assert [e.in_rotation for e in engine.endpoints] == [True, False]
        samples = engine.generate(PROMPTS[:1], SamplingParams(n=3))
        assert [s.weight_version for s in samples] == [4, 4, 4]
        assert engine.endpoints[1].consecutive_failures == 0 and engine.endpoints[1].outstanding == 0
        engine.close()
    nobody = _engine([_unused_url(), _unused_url()])
    with pytest.raises(RolloutError, match=r"no SGLang server answers /health; weight version 5 reached none"):
        nobody.update_weights(iter([("w", torch.ones(2))]), version=5)
    nobody.close()


def test_image_prompts_need_their_encoded_images() -> None:
    engine = _engine([_unused_url()])
    with pytest.raises(RolloutError, match=r"sample 'c' has image tokens in its prompt but no encoded images"):
        engine.generate([Sample(uid="c", prompt_ids=[1, VISION_TOKEN, 2])], SamplingParams())
    engine.close()


@pytest.mark.parametrize(("cap", "expected"), [(0, 12), (5, 5)], ids=["all_in_flight", "capped"])
def test_every_request_of_a_step_is_in_flight_unless_capped(cap: int, expected: int) -> None:
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def counting(server: FakeServer, path: str, body: Any) -> Answer:
        if path == "/generate":
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            threading.Event().wait(0.3)  # long enough for every submitted request to arrive meanwhile
            with lock:
                state["now"] -= 1
        return sglang_like(server, path, body)

    with fake_servers(counting, counting) as servers:
        engine = SGLangEngine(
            [s.url for s in servers], weight_sync=TensorWeightSync(), max_concurrency=cap, retry=FAST_RETRY
        )
        samples = engine.generate(PROMPTS, SamplingParams(n=6, max_new_tokens=8))
        engine.close()
    assert len(samples) == 12 and state["most"] == expected
