"""A scripted stand-in for an SGLang server, in-process on 127.0.0.1, for the client's fault handling and the weight
sync's request sequences: every request is recorded, and a test function decides each answer."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prism_mcore.rollout.protocol import generate_response


@dataclass
class Answer:
    status: int = 200
    body: Any = None  # JSON value; a str is sent as text
    delay_s: float = 0.0
    cut_off: bool = False  # announce the whole body, send half of it and close: a server killed mid-answer


Responder = Callable[["FakeServer", str, Any], Answer]


@dataclass
class FakeServer:
    responder: Responder
    weight_version: str = "0"
    requests: list[tuple[str, Any]] = field(default_factory=list)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _ in self.requests]


def completion(server: FakeServer, output_ids: list[int] | None = None) -> Answer:
    """A well-formed single /generate answer from `server`'s current weight version."""
    ids = output_ids if output_ids is not None else [5, 6, 2]
    body = generate_response(
        ids,
        [-0.5] * len(ids),
        "stop",
        matched_token=ids[-1],
        max_new_tokens=8,
        weight_version=server.weight_version,
        request_id="r",
        prompt_tokens=3,
        text="",
    )
    return Answer(body=body)


def sglang_like(server: FakeServer, path: str, body: Any) -> Answer:
    """Answers like a healthy SGLang server: completions, admin successes, version updates."""
    if path == "/generate":
        return completion(server)
    if path == "/server_info":
        return Answer(body={"tp_size": 1})
    if path == "/model_info":
        return Answer(body={"weight_version": server.weight_version})
    if path == "/flush_cache":
        return Answer(body="Cache flushed.\n")
    if isinstance(body, dict) and body.get("weight_version") is not None:
        server.weight_version = body["weight_version"]
    if path == "/update_weight_version":
        server.weight_version = body["new_version"]
    return Answer(body={"success": True, "message": "Success"})


@contextmanager
def fake_servers(*responders: Responder) -> Iterator[list[FakeServer]]:
    """One running fake server per responder."""
    servers, http_servers = [], []
    for responder in responders:
        fake = FakeServer(responder)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_state = fake

            def do_GET(self) -> None:  # noqa: N802
                self._answer()

            def do_POST(self) -> None:  # noqa: N802
                self._answer()

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with self.server_state.lock:
                    self.server_state.requests.append((self.path, body))
                answer = self.server_state.responder(self.server_state, self.path, body)
                if answer.delay_s:
                    threading.Event().wait(answer.delay_s)
                text = isinstance(answer.body, str)
                data = (answer.body if text else json.dumps(answer.body)).encode()
                self.send_response(answer.status)
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if answer.cut_off:
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        http_server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        http_server.daemon_threads = True
        threading.Thread(target=http_server.serve_forever, daemon=True).start()
        fake.url = f"http://127.0.0.1:{http_server.server_address[1]}"
        servers.append(fake)
        http_servers.append(http_server)
    try:
        yield servers
    finally:
        for http_server in http_servers:
            http_server.shutdown()
            http_server.server_close()
