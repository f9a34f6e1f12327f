"""One SGLang server as the client sees it: JSON calls over HTTP, and the state load balancing reads.

Every call classifies what went wrong, because the caller reacts differently:
- `ServerUnavailable`: no usable answer (connection refused or reset, timeout, HTTP 5xx or 503): retried later or on
  another server;
- `ServerRejected`: the server answered 4xx (a bad request, an admin endpoint refusing): retrying cannot help;
- `ProtocolError` (from `protocol`): a 2xx answer that is not what SGLang sends.

A server that fails is put in a cool-down that doubles with each consecutive failure (bounded by
`RetryPolicy.max_backoff_s`); a server that answered with another weight version than the client expects is marked
stale and left out until the next weight sync reaches it; a server that could not take a weight sync is out of
rotation (`in_rotation`) until it answers again with the current weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from prism_mcore.rollout.base import RolloutError
from prism_mcore.rollout.protocol import ProtocolError


class ServerUnavailable(RolloutError):
    """The server gave no usable answer (unreachable, timed out, 5xx); another attempt may succeed."""


class ServerRejected(RolloutError):
    """The server refused the request with a 4xx status; sending it again would fail again."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently requests are retried: attempt k waits `backoff_s * 2**k`, at most `max_backoff_s`."""

    max_retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"retry settings must be non-negative, got {self}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th consecutive failure (1-based)."""
        return min(self.backoff_s * 2 ** max(failures - 1, 0), self.max_backoff_s)


class SGLangEndpoint:
    """An SGLang server (or an sglang-router) at `url`."""

    def __init__(self, url: str, *, timeout_s: float, pool_size: int = 64) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        # One pooled connection per concurrent request thread, instead of a new TCP connection per completion.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # Load-balancing state, guarded by the engine's lock.
        self.outstanding = 0
        self.consecutive_failures = 0
        self.available_at = 0.0  # time.monotonic() before which the server is cooling down
        self.stale_version: str | None = None  # the version it answered with, when that was not the expected one
        self.in_rotation = True  # False after it missed a weight sync: it may hold old or half-loaded weights
        self.next_probe_at = 0.0  # time.monotonic() of the next check whether a server out of rotation is back
        self._tp_size: int | None = None

    def __repr__(self) -> str:
        return f"SGLangEndpoint({self.url!r})"

    def call(self, method: str, path: str, payload: Any = None, *, timeout_s: float | None = None) -> Any:
        """Send one request; returns the parsed JSON body (or the text, for endpoints that answer plain text)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            response = self.session.request(method, self.url + path, json=payload, timeout=timeout)
        except requests.Timeout:
            raise ServerUnavailable(f"{self.url}{path}: no answer within {timeout:g} s") from None
        except requests.ConnectionError as error:
            raise ServerUnavailable(f"{self.url}{path}: connection failed ({type(error).__name__})") from None
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as error:
            # The server went away while sending its answer (killed mid-batch): as unavailable as one that is down.
            raise ServerUnavailable(f"{self.url}{path}: the answer broke off ({type(error).__name__})") from None
        if response.status_code >= 500:
            raise ServerUnavailable(f"{self.url}{path}: HTTP {response.status_code} {_error_message(response)}")
        if response.status_code >= 400:
            raise ServerRejected(f"{self.url}{path}: HTTP {response.status_code} {_error_message(response)}")
        if not response.content:
            return None
        if response.headers.get("content-type", "").startswith("application/json"):
            try:
                return response.json()
            except json.JSONDecodeError as error:
                raise ProtocolError(self.url, path, f"is not valid JSON ({error})") from None
        return response.text

    def tp_size(self) -> int:
        """The server's tensor-parallel size (from `/server_info`), which sets how many tensor payloads it takes."""
        if self._tp_size is None:
            info = self.call("GET", "/server_info")
            tp_size = info.get("tp_size", 1) if isinstance(info, dict) else None
            if type(tp_size) is not int or tp_size < 1:
                raise ProtocolError(self.url, "/server_info tp_size", f"must be a positive integer, got {tp_size!r}")
            self._tp_size = tp_size
        return self._tp_size

    def mark_failed(self, retry: RetryPolicy) -> None:
        now = time.monotonic()
        if now < self.available_at:
            return  # requests in flight when the server failed fail together: one failure, not one per request
        self.consecutive_failures += 1
        self.available_at = now + retry.delay(self.consecutive_failures)

    def mark_succeeded(self) -> None:
        self.consecutive_failures = 0
        self.available_at = 0.0

    def close(self) -> None:
        self.session.close()


def _error_message(response: requests.Response) -> str:
    """The message of an SGLang error body (`{"error": {"message": ...}}`, `{"message": ...}`) or its text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in body:
            return str(body["message"])
    return json.dumps(body)[:500]
