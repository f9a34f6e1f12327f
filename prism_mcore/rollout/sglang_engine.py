"""SGLangEngine: rollouts from one or more SGLang servers over HTTP (production), or from one sglang-router URL.

Each completion is one `/generate` request (the n responses to a prompt are n requests), sent from a thread pool to
the server with the fewest outstanding requests (ties go round robin). Sending them one by one, rather than with
SGLang's `n`, gives every completion its own `sampling_seed` (one seed shared by n parallel samples would make them
identical) and lets a failure or a stale answer be redone alone; SGLang's radix cache still shares the prompt's
prefix between the n requests.

Fault handling, per completion, at most `RetryPolicy.max_retries + 1` attempts:
- a server that cannot be reached, times out or answers 5xx cools down (exponentially, per server) and the
  request goes to another server, or waits for this one to come back;
- an aborted request (`finish_reason.type == "abort"`) is sent again;
- an answer from another weight version than the engine's (`meta_info.weight_version`) is discarded, never mixed
  into the batch, and its server is left out until the next weight sync reaches it;
- a response containing a vision placeholder id is sampled again (the policy must not emit those);
- a 4xx answer or a malformed response raises at once, naming the server and the field.
When the attempts run out, `RolloutError` lists what each attempt met.

Weight updates go through a `WeightSync` strategy (tensor, distributed or disk; see `weight_sync`), then
`/flush_cache`; the servers' weight version is the engine's version as a string. A sync goes to the servers that
answer `/health`; the others, and any lost during the sync, are taken out of rotation (a warning names them), and
the sync fails only when no server takes it. A server out of rotation is asked again (`/model_info`, at most every
`REPROBE_S`) before a generation: it comes back at once if it answers with the current weight version, and otherwise
at the next sync, which pushes the current weights to it before it serves again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from prism_mcore.record import Sample
from prism_mcore.rollout.base import RolloutEngine, RolloutError, SamplingParams, completed_sample
from prism_mcore.rollout.endpoint import RetryPolicy, ServerRejected, ServerUnavailable, SGLangEndpoint
from prism_mcore.rollout.protocol import Completion, generate_payload, parse_generate_response, sglang_sampling_params
from prism_mcore.rollout.weight_sync import WeightSync, WeightSyncError
from prism_mcore.training.metrics import get_logger

logger = get_logger(__name__)
DEFAULT_POOL_SIZE = 256  # pooled HTTP connections per server when concurrency is unbounded (more are not kept)

# How long a health check waits: SGLang's own `/health_generate` gives its one-token generation 20 s.
HEALTH_TIMEOUT_S = 20.0
PROBE_TIMEOUT_S = 5.0  # `/health` before a weight sync and `/model_info` of a server out of rotation
REPROBE_S = 10.0  # how often a server out of rotation is asked whether it is back


class SGLangEngine(RolloutEngine):
    """A client for SGLang servers; see the module docstring for load balancing and fault handling."""

    def __init__(
        self,
        server_urls: Sequence[str],
        *,
        weight_sync: WeightSync,
        request_timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
        max_concurrency: int = 0,
        vision_token_ids: Sequence[int] = (),
        weight_version: int = 0,
    ) -> None:
        if not server_urls:
            raise ValueError("SGLangEngine needs at least one server URL (rollout.server_urls)")
        if len(set(server_urls)) != len(server_urls):
            raise ValueError(f"rollout.server_urls lists a server twice: {list(server_urls)}")
        self.endpoints = [
            SGLangEndpoint(url, timeout_s=request_timeout_s, pool_size=max_concurrency or DEFAULT_POOL_SIZE)
            for url in server_urls
        ]
        self.weight_sync = weight_sync
        self.retry = retry or RetryPolicy()
        # Placeholders only the processor may place: a response must not contain one (see `rollout.base`).
        self.vision_token_ids = frozenset(int(token) for token in vision_token_ids)
        self._weight_version = weight_version
        self.max_concurrency = max_concurrency  # 0: every request of a generate call in flight at once
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency or 1, thread_name_prefix="sglang-request")
        self._executor_size = max_concurrency or 1
        self._lock = threading.Condition()
        self._round_robin = 0

    @property
    def weight_version(self) -> int:
        return self._weight_version

    # ---- readiness and health ----

    def wait_until_ready(self, timeout_s: float = 600.0, poll_s: float = 2.0) -> None:
        """Block until every server answers `/health_generate`, then label the servers' current weights with the
        engine's weight version (servers start with the label `--weight-version`, SGLang's default "default").

        Raises `RolloutError` naming the servers that were not ready within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        waiting = list(self.endpoints)
        while waiting:
            waiting = [endpoint for endpoint in waiting if not self._answers_health_generate(endpoint)]
            if waiting and time.monotonic() + poll_s > deadline:
                urls = ", ".join(endpoint.url for endpoint in waiting)
                raise RolloutError(f"SGLang servers not ready within {timeout_s:g} s: {urls}")
            if waiting:
                time.sleep(poll_s)
        label = str(self._weight_version)
        for endpoint in self.endpoints:
            info = endpoint.call("GET", "/model_info")
            if not isinstance(info, dict) or info.get("weight_version") != label:
                endpoint.call("POST", "/update_weight_version", {"new_version": label, "abort_all_requests": False})
            endpoint.stale_version = None

    @staticmethod
    def _answers_health_generate(endpoint: SGLangEndpoint) -> bool:
        try:
            endpoint.call("GET", "/health_generate", timeout_s=HEALTH_TIMEOUT_S)
        except (ServerUnavailable, ServerRejected):
            return False
        return True

    def server_health(self) -> dict[str, bool]:
        """Whether each server can generate now (`/health_generate`, one generated token)."""
        return {endpoint.url: self._answers_health_generate(endpoint) for endpoint in self.endpoints}

    # ---- generation ----

    def generate(self, prompts: Sequence[Sample], params: SamplingParams) -> list[Sample]:
        self._readmit_servers()
        for prompt in prompts:
            if not prompt.images and self.vision_token_ids.intersection(prompt.prompt_ids):
                raise RolloutError(
                    f"sample {prompt.uid!r} has image tokens in its prompt but no encoded images (Sample.images), "
                    "which SGLang servers need"
                )
        self._executor_for(len(prompts) * params.n)
        futures: list[Future[Completion]] = []
        for prompt_index, prompt in enumerate(prompts):
            payload = generate_payload(prompt, sglang_sampling_params(params))  # images encoded once per prompt
            for copy in range(params.n):
                # Distinct seeds: SGLang derives every sampled token from (seed, position).
                seed = None if params.seed is None else params.seed + prompt_index * params.n + copy
                request = {**payload, "sampling_params": sglang_sampling_params(params, seed)}
                futures.append(self._executor.submit(self._complete, request, prompt.uid))
        try:
            completions = [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        rows = [prompt for prompt in prompts for _ in range(params.n)]
        return [
            completed_sample(
                row, completion.output_ids, completion.logprobs, completion.finish_reason, self._weight_version
            )
            for row, completion in zip(rows, completions, strict=True)
        ]

    def _executor_for(self, requests: int) -> None:
        """Grow the request threads to `requests` (all prompts x n of a step in flight, so every server stays busy)
        unless `max_concurrency` caps them; between calls the pool is idle, so the old one is simply replaced."""
        size = requests if not self.max_concurrency else min(requests, self.max_concurrency)
        if size > self._executor_size:
            self._executor.shutdown(wait=False)
            self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="sglang-request")
            self._executor_size = size

    def _complete(self, payload: dict[str, Any], uid: str) -> Completion:
        """One completion of one prompt, from the attempts the retry policy allows."""
        expected_version = str(self._weight_version)
        attempts: list[str] = []
        for _ in range(self.retry.max_retries + 1):
            endpoint = self._acquire_endpoint(expected_version)
            try:
                body = endpoint.call("POST", "/generate", payload)
            except ServerUnavailable as error:
                with self._lock:
                    endpoint.mark_failed(self.retry)
                attempts.append(str(error))
                continue
            finally:
                self._release_endpoint(endpoint)
            completion = parse_generate_response(body, endpoint.url)
            with self._lock:
                endpoint.mark_succeeded()
                if completion.finish_reason is not None and completion.weight_version != expected_version:
                    endpoint.stale_version = completion.weight_version
            if completion.finish_reason is None:
                attempts.append(f"{endpoint.url}: request aborted ({completion.abort_message or 'no reason given'})")
            elif completion.weight_version != expected_version:
                attempts.append(f"{endpoint.url}: answered from weight version {completion.weight_version!r}")
            elif self.vision_token_ids.intersection(completion.output_ids):
                attempts.append(f"{endpoint.url}: response contains a vision placeholder token; sampled again")
                payload = _next_seed(payload)  # the same seed would sample the same tokens again
            else:
                return completion
        raise RolloutError(f"no completion for sample {uid!r} after {len(attempts)} attempts: " + "; ".join(attempts))

    def _acquire_endpoint(self, expected_version: str) -> SGLangEndpoint:
        """The usable server with the fewest outstanding requests; waits while all of them are cooling down."""
        with self._lock:
            while True:
                fresh = [e for e in self.endpoints if e.stale_version is None and e.in_rotation]
                if not fresh:
                    versions = ", ".join(
                        f"{e.url} has {e.stale_version!r}" if e.in_rotation else f"{e.url} is out of rotation"
                        for e in self.endpoints
                    )
                    raise RolloutError(
                        f"no server holds weight version {expected_version!r} ({versions}); "
                        "sync the weights again (update_weights) before generating"
                    )
                now = time.monotonic()
                ready = [endpoint for endpoint in fresh if endpoint.available_at <= now]
                if ready:
                    self._round_robin += 1
                    start = self._round_robin % len(ready)
                    rotated = ready[start:] + ready[:start]
                    endpoint = min(rotated, key=lambda candidate: candidate.outstanding)
                    endpoint.outstanding += 1
                    return endpoint
                # Every fresh server is cooling down; the wait is bounded by the shortest cool-down.
                self._lock.wait(timeout=min(endpoint.available_at for endpoint in fresh) - now)

    def _release_endpoint(self, endpoint: SGLangEndpoint) -> None:
        with self._lock:
            endpoint.outstanding -= 1
            self._lock.notify_all()

    # ---- weights and memory ----

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Push the weights to every server that answers `/health`; those that do not, or are lost during the
        push, go out of rotation. Raises `WeightSyncError` when no server takes the weights."""
        label = str(version)
        reachable = [endpoint for endpoint in self.endpoints if self._answers(endpoint, "/health")]
        if not reachable:
            urls = ", ".join(endpoint.url for endpoint in self.endpoints)
            raise WeightSyncError(f"no SGLang server answers /health; weight version {version} reached none: {urls}")
        lost = self.weight_sync.push(reachable, named_tensors, label)
        synced = []
        for endpoint in reachable:
            if endpoint not in lost and self._flush_cache(endpoint):
                synced.append(endpoint)
        if not synced:
            raise WeightSyncError(f"every SGLang server was lost during the sync of weight version {version}")
        with self._lock:
            self._weight_version = version
            for endpoint in self.endpoints:
                endpoint.stale_version = None
                endpoint.in_rotation = endpoint in synced
                endpoint.next_probe_at = time.monotonic() + REPROBE_S
                if endpoint.in_rotation:
                    endpoint.mark_succeeded()
            self._lock.notify_all()
        missing = [endpoint.url for endpoint in self.endpoints if endpoint not in synced]
        if missing:
            logger.warning(
                f"rollout weights v{version} reached {len(synced)} of {len(self.endpoints)} SGLang servers; out of "
                f"rotation until they answer again and take the weights: {', '.join(missing)}"
            )
        else:
            logger.info(f"rollout weights v{version} synced to {len(self.endpoints)} SGLang server(s)")

    @staticmethod
    def _answers(endpoint: SGLangEndpoint, path: str) -> Any:
        """`endpoint`'s answer to GET `path`, or None when it gives none (unreachable, error status)."""
        try:
            return endpoint.call("GET", path, timeout_s=PROBE_TIMEOUT_S) or True
        except (ServerUnavailable, ServerRejected):
            return None

    def _readmit_servers(self) -> None:
        """Ask each server out of rotation (at most every `REPROBE_S`) whether it is back: one that answers with
        the current weight version serves again; one with other weights waits for the next sync."""
        now = time.monotonic()
        with self._lock:
            due = [e for e in self.endpoints if not e.in_rotation and e.next_probe_at <= now]
            for endpoint in due:
                endpoint.next_probe_at = now + REPROBE_S
        for endpoint in due:
            info = self._answers(endpoint, "/model_info")
            if isinstance(info, dict) and info.get("weight_version") == str(self._weight_version):
                with self._lock:
                    endpoint.in_rotation = True
                    endpoint.mark_succeeded()
                logger.info(
                    f"{endpoint.url} answers again with weight version {self._weight_version}: back in rotation"
                )

    def _flush_cache(self, endpoint: SGLangEndpoint) -> bool:
        """`/flush_cache`, which SGLang refuses (400) while requests are still running: those finish within the
        request timeout, so a few spaced retries suffice. False when the server gave no answer (it is lost)."""
        for attempt in range(self.retry.max_retries + 1):
            try:
                endpoint.call("POST", "/flush_cache")
                return True
            except ServerUnavailable:
                return False
            except ServerRejected:
                if attempt == self.retry.max_retries:
                    raise
                time.sleep(self.retry.delay(attempt + 1))
        return False

    def release_memory(self) -> None:
        """`/release_memory_occupation` on every server (colocated training: weights, KV cache and CUDA graphs)."""
        self._on_every_server("/release_memory_occupation")

    def resume_memory(self) -> None:
        self._on_every_server("/resume_memory_occupation")

    def _on_every_server(self, path: str) -> None:
        """POST `path` to each server in rotation; one that gives no answer goes out of rotation (the next sync
        tries it again), and only when none answers does this raise."""
        answered = 0
        for endpoint in [endpoint for endpoint in self.endpoints if endpoint.in_rotation]:
            try:
                endpoint.call("POST", path, {})
                answered += 1
            except ServerUnavailable as error:
                logger.warning(f"{error}; {endpoint.url} is out of rotation until the next weight sync reaches it")
                with self._lock:
                    endpoint.in_rotation = False
        if not answered:
            raise RolloutError(f"{path}: no SGLang server in rotation answered")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.weight_sync.close(self.endpoints)
        for endpoint in self.endpoints:
            endpoint.close()


RESAMPLE_SEED_STRIDE = 1_000_003  # a prime far above any batch's seed offsets


def _next_seed(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` with a different `sampling_seed` (if it has one), for sampling a rejected completion again."""
    params = payload.get("sampling_params") or {}
    if params.get("sampling_seed") is None:
        return payload
    return {**payload, "sampling_params": {**params, "sampling_seed": params["sampling_seed"] + RESAMPLE_SEED_STRIDE}}
