"""The project's SGLang-protocol server under hostile or careless clients, over real HTTP on 127.0.0.1: local image
paths, image bounds, `max_new_tokens` at the context, cancelled work of departed clients, idle connections, bad
`Content-Length`, field types, and many concurrent requests. Every wait is bounded, so a regression fails instead of
hanging the suite."""

from __future__ import annotations

import base64
import io
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from prism_mcore.data.embedded import EmbeddedAssets
from prism_mcore.record import Sample
from prism_mcore.rollout.protocol import image_data_uri
from prism_mcore.rollout.server import RolloutServer, ServerLimits, serve
from tests.http_support import serving

IDLE_TIMEOUT_S = 1.0
MAX_IMAGE_BYTES = 200_000
MAX_IMAGE_PIXELS = 1024 * 1024
MAX_BODY_BYTES = 4 * 1024**2
MAX_QUEUED = 60


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def rollout(embedded: EmbeddedAssets, image_dir: Path) -> RolloutServer:
    limits = ServerLimits(
        allowed_image_dir=image_dir,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_image_pixels=MAX_IMAGE_PIXELS,
        max_body_bytes=MAX_BODY_BYTES,
        idle_timeout_s=IDLE_TIMEOUT_S,
        max_queued_requests=MAX_QUEUED,
    )
    return RolloutServer(embedded.policy_path, limits=limits)


@pytest.fixture(scope="module")
def url(rollout: RolloutServer) -> Iterator[str]:
    with serving(serve(rollout, "127.0.0.1", 0)) as base_url:
        yield base_url


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_prompt(prompt: Sample, image_token_id: int) -> list[int]:
    """The prompt with one `<|image_pad|>` per image block (the server expands it to the image's grid)."""
    ids = prompt.prompt_ids
    return [t for i, t in enumerate(ids) if t != image_token_id or ids[i - 1] != t]


def _error(response: requests.Response) -> str:
    return response.json()["error"]["message"]


def test_local_image_paths_only_inside_the_allowed_folder(
    url: str, rollout: RolloutServer, prompts: list[Sample], image_dir: Path, tmp_path: Path
) -> None:
    input_ids = _image_prompt(prompts[0], rollout.image_token_id)
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(64, 64))
    (image_dir / "inside.png").write_bytes(_png(64, 64))
    (image_dir / "escape.png").symlink_to(outside)
    os.mkfifo(image_dir / "fifo.png")

    def post(item: str) -> requests.Response:
        body = {"input_ids": input_ids, "image_data": item, "sampling_params": {"max_new_tokens": 1}}
        return requests.post(f"{url}/generate", json=body, timeout=30)

    # An existing and a missing file outside the folder get the same answer: nothing to learn about the disk.
    existing, missing = post(f"file://{outside}"), post(f"file://{tmp_path / 'missing.png'}")
    assert existing.status_code == missing.status_code == 400
    assert _error(existing) == _error(missing)
    assert "--allowed-image-dir" in _error(existing)
    for refused in (str(outside), "escape.png", "../secret.png", "fifo.png", "file:///dev/zero", "/proc/self/environ"):
        answer = post(refused)
        assert answer.status_code == 400, refused
        assert _error(answer) == _error(existing), refused
    assert post("inside.png").status_code == 200
    assert post(f"file://{image_dir / 'inside.png'}").status_code == 200


def test_images_are_bounded_by_bytes_and_pixels_before_decoding(
    url: str, rollout: RolloutServer, prompts: list[Sample]
) -> None:
    input_ids = _image_prompt(prompts[0], rollout.image_token_id)
    # A 2000x2000 PNG of one colour is a few kB but 4M pixels: refused from its header, before decoding.
    wide = _png(2000, 2000)
    assert len(wide) < MAX_IMAGE_BYTES
    body = {"input_ids": input_ids, "image_data": image_data_uri(wide), "sampling_params": {"max_new_tokens": 1}}
    answer = requests.post(f"{url}/generate", json=body, timeout=30)
    assert answer.status_code == 400
    assert "4000000 pixels, over max_input_pixels=1048576" in _error(answer)
    big = base64.b64encode(os.urandom(MAX_IMAGE_BYTES + 10)).decode()
    answer = requests.post(f"{url}/generate", json={**body, "image_data": big}, timeout=30)
    assert answer.status_code == 400
    assert f"over the {MAX_IMAGE_BYTES}-byte limit" in _error(answer)


def test_max_new_tokens_is_capped_at_the_context(url: str, rollout: RolloutServer) -> None:
    """A prompt three tokens short of the context and max_new_tokens 1e9: at most three tokens come back."""
    assert rollout.context_length == 4096
    prompt = [100 + index % 400 for index in range(rollout.context_length - 3)]
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 10**9, "temperature": 0.0}}
    answer = requests.post(f"{url}/generate", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    meta = answer.json()["meta_info"]
    assert meta["completion_tokens"] <= 3
    assert meta["finish_reason"]["type"] == "stop" or meta["finish_reason"] == {"type": "length", "length": 3}
    full = {"input_ids": prompt + [1, 2, 3], "sampling_params": {"max_new_tokens": 1}}
    refused = requests.post(f"{url}/generate", json=full, timeout=30)
    assert refused.status_code == 400
    assert _error(refused) == "prompt 0 has 4096 tokens (images expanded); the model's context is 4096"


def _raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(head.encode() + b"\r\n\r\n" + body)
    return connection


def _read_answer(connection: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = connection.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_departed_clients_generation_is_cancelled(url: str, rollout: RolloutServer) -> None:
    """A client asks for 4000 greedy tokens and hangs up after a second: the engine is free again within seconds,
    not after the whole generation."""
    port = int(url.rsplit(":", 1)[1])
    payload = b'{"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4000, "temperature": 0.0}}'
    head = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}"
    connection = _raw_request(port, head, payload)
    deadline = time.monotonic() + 30
    while rollout.running_requests == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rollout.running_requests == 1
    time.sleep(1.0)
    connection.close()
    started = time.monotonic()
    deadline = started + 30
    while rollout.running_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rollout.running_requests == 0
    assert time.monotonic() - started < 5.0
    quick = requests.post(
        f"{url}/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}, timeout=30
    )
    assert quick.status_code == 200


def test_idle_connections_are_closed(url: str) -> None:
    port = int(url.rsplit(":", 1)[1])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
        assert idle.recv(1) == b""  # the server hung up; without an idle timeout this recv times out
    assert time.monotonic() - started < IDLE_TIMEOUT_S + 3
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")  # the rest never comes
        assert slow.recv(1) == b""


@pytest.mark.parametrize(
    ("content_length", "status", "message"),
    [
        ("-1", 400, "Content-Length must be a non-negative integer, got '-1'"),
        ("abc", 400, "Content-Length must be a non-negative integer, got 'abc'"),
        (str(10**12), 413, f"the body is {10**12} bytes; this server takes at most {MAX_BODY_BYTES} (--max-body-mb)"),
        (str(MAX_BODY_BYTES + 1), 413, "this server takes at most"),
    ],
)
def test_bad_content_length_is_refused_at_once(url: str, content_length: str, status: int, message: str) -> None:
    port = int(url.rsplit(":", 1)[1])
    head = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {content_length}"
    with _raw_request(port, head, b"{}") as connection:
        connection.settimeout(10)
        answer = _read_answer(connection)  # the server answers and closes; no wait for a body that never comes
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == str(status).encode()
    assert message in rest.decode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "5"}},
            'sampling_params.max_new_tokens must be an integer, got "5"',
        ),
        (
            {"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}},
            'sampling_params.temperature must be a number, got "hot"',
        ),
        ({"input_ids": [1, 2], "sampling_params": {"n": True}}, "sampling_params.n must be an integer, got true"),
        ({"input_ids": [1, 2], "sampling_params": {"top_k": 1.5}}, "sampling_params.top_k must be an integer, got 1.5"),
        ({"input_ids": [1, 2], "return_logprob": "yes"}, 'return_logprob must be true or false, got "yes"'),
        ({"input_ids": "1 2 3"}, "input_ids must be a non-empty list of token ids or a list of such lists"),
        (
            {"input_ids": [1, 2], "sampling_params": {"n": 10**9}},
            "1 prompts x n=1000000000 completions; at most 256 per request",
        ),
    ],
)
def test_field_types_get_clear_400s(url: str, body: dict[str, object], message: str) -> None:
    answer = requests.post(f"{url}/generate", json=body, timeout=30)
    assert answer.status_code == 400
    assert _error(answer) == message


def test_admin_payloads_are_checked_before_use(url: str) -> None:
    """An announced shape of 10**12 floats is refused before it is allocated; missing fields are named."""
    requests.post(f"{url}/begin_weight_update", json={}, timeout=30)
    try:
        huge = {"names": ["lm_head.weight"], "dtypes": ["float32"], "shapes": [[10**6, 10**6]]}
        answer = requests.post(f"{url}/update_weights_from_distributed", json=huge, timeout=30)
        assert answer.status_code == 400
        assert answer.json()["message"] == (
            "'lm_head.weight' with shape [1000000, 1000000] is not a parameter of the served model"
        )
    finally:
        requests.post(f"{url}/end_weight_update", json={}, timeout=30)
    answer = requests.post(f"{url}/init_weights_update_group", json={"backend": "gloo"}, timeout=30)
    assert answer.status_code == 400
    assert answer.json() == {"success": False, "message": "master_address (a string) is required"}


def test_concurrent_requests_queue_instead_of_resetting(url: str) -> None:
    """50 clients at once: every one is answered (none reset), in turn."""
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}}

    def post(_: int) -> int:
        with requests.Session() as session:
            return session.post(f"{url}/generate", json=body, timeout=120).status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(post, range(50)))
    assert statuses == [200] * 50


def test_a_full_queue_answers_busy(embedded: EmbeddedAssets, url: str, rollout: RolloutServer) -> None:
    """With the engine held and `max_queued_requests` already waiting, the next request gets 503 at once."""
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}}
    with ThreadPoolExecutor(max_workers=MAX_QUEUED) as pool:
        with rollout.engine_lock:
            waiting = [pool.submit(requests.post, f"{url}/generate", json=body, timeout=120) for _ in range(MAX_QUEUED)]
            deadline = time.monotonic() + 60
            while rollout.queued_requests < MAX_QUEUED and time.monotonic() < deadline:
                time.sleep(0.05)
            assert rollout.queued_requests == MAX_QUEUED
            busy = requests.post(f"{url}/generate", json=body, timeout=30)
            assert busy.status_code == 503 and "the server is busy" in _error(busy)
    assert [future.result().status_code for future in waiting] == [200] * MAX_QUEUED
