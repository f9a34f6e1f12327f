"""prism_mcore's own SGLang-protocol server, backed by LocalEngine, for development and for testing the SGLang
client over real HTTP on machines where SGLang cannot run (no GPU):

    python -m prism_mcore.rollout.server --model-path DIR --port P [--host 127.0.0.1]

It serves the subset of SGLang 0.5.23's HTTP API that makes sense on a CPU, with SGLang's request and response
shapes (see `rollout.protocol`): `/generate` (single or batch `input_ids`, `n`, `image_data` as data URIs, base64 or
(with `--allowed-image-dir`) file paths, processed by the checkpoint's own image processor), `/health`, `/health_generate`, `/ready`,
`/model_info`, `/server_info` (and their `/get_*` aliases), `/flush_cache`, `/update_weights_from_disk`,
`/update_weights_from_tensor`, `/init_weights_update_group` + `/update_weights_from_distributed` +
`/destroy_weights_update_group` (gloo groups on CPU), `/update_weight_version`, `/begin_weight_update`,
`/end_weight_update`, `/release_memory_occupation` and `/resume_memory_occupation`.

Differences from SGLang, all deliberate:
- one request runs at a time (a lock around the engine), so it is a correctness server, not a throughput server;
- `/update_weights_from_tensor` takes CPU tensors pickled by value (`protocol.serialize_named_tensors`), not CUDA
  IPC handles, and unpickles only tensor lists;
- on CPU, weight-update groups use gloo (NCCL needs GPUs); the rendezvous is SGLang's;
- memory release only marks the state (generation then answers 503) and offloads nothing on CPU;
- only the sampling parameters LocalEngine implements are accepted; others are refused with 400.
Bounds, so that no client can hold or exhaust the server (`ServerLimits`, each a command-line flag):
- `max_new_tokens` is capped at the model's context minus the prompt (SGLang does the same); a prompt that fills the
  context is refused; at most `MAX_COMPLETIONS_PER_REQUEST` completions per request;
- a request whose client disconnects is cancelled: between decoding steps and while it waits for the engine;
- requests wait their turn in a queue (listen backlog `LISTEN_BACKLOG`); beyond `--max-queued-requests` waiting for
  the engine, the answer is 503 "busy" instead of a connection reset;
- idle connections are closed after `--idle-timeout-s`, and a body must arrive within `BODY_DEADLINE_S`;
- `Content-Length` must be a non-negative integer (400) within `--max-body-mb` (413;
  `/update_weights_from_tensor` within `--max-weights-body-mb`); request fields are type-checked (400), and an
  unexpected failure answers 500 without Python's exception text (that goes to the server's log);
- `image_data` items are data URIs or base64; local paths (`file://` or plain) are read only with
  `--allowed-image-dir`, and only regular files inside that folder; every image is bounded by `--max-image-mb`
  and `--max-image-pixels` before it is decoded.
As in SGLang 0.5.23, `/update_weights_from_tensor` and `/update_weights_from_distributed` must run between
`/begin_weight_update` and `/end_weight_update`, and generation waits while such a session is open. The server binds
to 127.0.0.1 unless told otherwise: its admin endpoints change the served weights, and the tensor endpoint unpickles
what it is sent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from prism_mcore.data.errors import DataError
from prism_mcore.data.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    HFImageProcessor,
    ImageConfig,
    load_image_processor,
)
from prism_mcore.hf_checkpoint import read_hf_weights
from prism_mcore.record import Sample
from prism_mcore.rollout.base import RolloutError, SamplingParams
from prism_mcore.rollout.local import GenerationCancelled, LocalEngine
from prism_mcore.rollout.protocol import decode_image_data, deserialize_named_tensors, generate_response
from prism_mcore.rollout.weight_sync import init_weight_update_group
from prism_mcore.training.metrics import get_logger

logger = get_logger(__name__)

# SGLang sampling keys this server implements, and what they map to; SGLang's other keys are refused.
SAMPLING_KEYS = {
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop_token_ids",
    "n",
    "sampling_seed",
    "skip_special_tokens",
}
SAMPLING_TYPES: dict[str, type | tuple[type, ...]] = {
    "max_new_tokens": int,
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": int,
    "n": int,
    "sampling_seed": int,
    "skip_special_tokens": bool,
}
SAMPLING_DEFAULTS = {"max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "n": 1}
# How long a generate request waits for an open weight-update session to end before answering 503.
SESSION_WAIT_S = 600.0
SESSION_ERROR = "{} must run between begin_weight_update() and end_weight_update()"


INCOMPLETE_UPDATE = "incomplete-update"  # the weight version of a server whose last weight load failed part-way
MAX_COMPLETIONS_PER_REQUEST = 256  # prompts times n in one /generate request
LISTEN_BACKLOG = 1024  # connections the kernel queues before the server accepts them (http.server's default: 5)
BODY_DEADLINE_S = 300.0  # a request body must arrive within this, however slowly its bytes come
LOCK_POLL_S = 0.2  # how often a queued request checks whether its client is still there
MiB = 1024**2


@dataclass(frozen=True)
class ServerLimits:
    """What one client may ask of the server (see the module docstring); defaults as documented in the README."""

    allowed_image_dir: Path | None = None  # local image paths are read only inside this folder; None: never
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_body_bytes: int = 256 * MiB
    max_weights_body_bytes: int = 4096 * MiB  # /update_weights_from_tensor: one bucket of pickled tensors, base64
    idle_timeout_s: float = 60.0
    max_queued_requests: int = 256


class ClientGone(Exception):
    """The client of a request disconnected; the request is dropped without an answer."""


class RequestError(Exception):
    """A request the server refuses; becomes an HTTP error with SGLang's `{"error": {"message": ...}}` body."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


class AdminError(Exception):
    """An admin request that failed; becomes SGLang's `{"success": false, "message": ...}` answer with 400."""


@dataclass
class Reply:
    """What a route answers: a JSON value (None is JSON null) or, with `text`, a plain-text body."""

    body: Any = None
    status: HTTPStatus = HTTPStatus.OK
    text: str | None = None


class RolloutServer:
    """The endpoints' logic, independent of the HTTP plumbing; every method returns a `Reply`."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        weight_version: str = "default",
        limits: ServerLimits = ServerLimits(),
    ) -> None:
        self.model_path = str(model_path)
        self.limits = limits
        self.engine = LocalEngine.from_pretrained(model_path, device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        image_config = ImageConfig(
            backend="hf", max_input_pixels=limits.max_image_pixels, max_image_bytes=limits.max_image_bytes
        )
        self.images = HFImageProcessor(load_image_processor(self.model_path), image_config)
        config = self.engine.model.config
        self.context_length = int(config.text_config.max_position_embeddings)
        self.image_token_id = config.image_token_id
        self.vision_start_token_id = config.vision_start_token_id
        self.vision_end_token_id = config.vision_end_token_id
        self.vocab_size = self.engine.model.get_input_embeddings().num_embeddings
        self.weight_version = weight_version
        self.engine_lock = threading.Lock()  # one generation or weight load at a time
        self.state = threading.Condition()  # guards the fields below
        self.running_requests = 0
        self.queued_requests = 0  # requests waiting for the engine lock
        self.session_open = False
        self.memory_released = False
        self.update_groups: dict[str, dist.ProcessGroup] = {}  # weight-update groups joined, by name

    # ---- generation ----

    def generate(self, body: Any, client_gone: Callable[[], bool] = lambda: False) -> Reply:
        """SGLang's `/generate`; `client_gone` (asked between decoding steps and while queued) cancels the work of
        a client that disconnected."""
        if not isinstance(body, dict):
            raise RequestError("the /generate body must be a JSON object")
        _check_type(body, "stream", bool)
        _check_type(body, "return_logprob", bool)
        _check_type(body, "logprob_start_len", int)
        if body.get("stream"):
            raise RequestError("stream=true is not supported by this server")
        if body.get("text") is not None or body.get("input_ids") is None:
            raise RequestError("this server takes input_ids (token ids), not text")
        if body.get("logprob_start_len", -1) not in (-1, None):
            raise RequestError("only output-token log-probs are supported (logprob_start_len=-1)")
        input_ids = body["input_ids"]
        single = isinstance(input_ids, list) and bool(input_ids) and all(type(token) is int for token in input_ids)
        prompts = [input_ids] if single else input_ids
        if not isinstance(prompts, list) or not prompts:
            raise RequestError("input_ids must be a non-empty list of token ids or a list of such lists")
        if not all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompts):
            raise RequestError("input_ids must be a non-empty list of token ids or a list of such lists")
        for index, ids in enumerate(prompts):
            outside = [token for token in ids if not 0 <= token < self.vocab_size]
            if outside:
                raise RequestError(
                    f"prompt {index}: token ids {outside[:5]} outside the vocabulary [0, {self.vocab_size})"
                )
        images = self._images_per_prompt(body.get("image_data"), len(prompts), single)
        sampling = self._sampling_per_prompt(body.get("sampling_params"), len(prompts))
        if len(prompts) * sampling[0][0].n > MAX_COMPLETIONS_PER_REQUEST:
            raise RequestError(
                f"{len(prompts)} prompts x n={sampling[0][0].n} completions; at most {MAX_COMPLETIONS_PER_REQUEST} "
                "per request"
            )
        return_logprob = bool(body.get("return_logprob"))

        samples = [
            self._sample(index, ids, items) for index, (ids, items) in enumerate(zip(prompts, images, strict=True))
        ]
        sampling = [
            (self._within_context(sample, params), skip)
            for sample, (params, skip) in zip(samples, sampling, strict=True)
        ]
        outputs = []
        # The engine is held for the whole request, so a weight load cannot land between its prompts.
        with self._generation_slot(), self._engine_turn(client_gone):
            for sample, (params, skip_special) in zip(samples, sampling, strict=True):
                try:
                    completions = self.engine.generate([sample], params, cancelled=client_gone)
                except GenerationCancelled:
                    raise ClientGone from None
                except RolloutError as error:  # a prompt the engine cannot take: the client's to fix, not a fault
                    raise RequestError(f"prompt {sample.uid}: {error}") from None
                for completion in completions:
                    response = self._response(sample, completion, params, skip_special, self.weight_version)
                    outputs.append(response if return_logprob else _without_logprobs(response))
        n = sampling[0][0].n
        return Reply(outputs[0] if single and n == 1 else outputs)

    def _within_context(self, sample: Sample, params: SamplingParams) -> SamplingParams:
        """`params` with `max_new_tokens` capped so that prompt and response fit the model's context, as SGLang
        caps it; a prompt that leaves no room is refused."""
        room = self.context_length - len(sample.prompt_ids)
        if room < 1:
            raise RequestError(
                f"prompt {sample.uid} has {len(sample.prompt_ids)} tokens (images expanded); the model's context "
                f"is {self.context_length}"
            )
        if params.max_new_tokens <= room:
            return params
        return dataclasses.replace(params, max_new_tokens=room)

    def _images_per_prompt(self, image_data: Any, batch_size: int, single: bool) -> list[list[Any]]:
        """SGLang's normalisation of `image_data`: a single request takes one image or a list of images; a batch
        takes one entry per prompt, each an image, a list of images or null."""
        if image_data is None or image_data == []:
            return [[] for _ in range(batch_size)]
        if single:
            return [image_data if isinstance(image_data, list) else [image_data]]
        if not isinstance(image_data, list) or len(image_data) != batch_size:
            raise RequestError("image_data must have one entry per prompt of the batch")
        return [[] if item is None else item if isinstance(item, list) else [item] for item in image_data]

    @staticmethod
    def _sampling_per_prompt(sampling: Any, batch_size: int) -> list[tuple[SamplingParams, bool]]:
        if sampling is None:
            sampling = {}
        entries = sampling if isinstance(sampling, list) else [sampling] * batch_size
        if len(entries) != batch_size or not all(isinstance(entry, dict) for entry in entries):
            raise RequestError("sampling_params must be an object or a list of one object per prompt")
        parsed = []
        for entry in entries:
            unknown = sorted(set(entry) - SAMPLING_KEYS)
            if unknown:
                raise RequestError(
                    f"sampling_params {unknown} not supported by this server; it takes {sorted(SAMPLING_KEYS)}"
                )
            values = {
                key: entry.get(key) if entry.get(key) is not None else default
                for key, default in SAMPLING_DEFAULTS.items()
            }
            for key, kinds in SAMPLING_TYPES.items():
                _check_type(entry, key, kinds, "sampling_params.")
            stop = entry.get("stop_token_ids")
            if stop is not None and not (isinstance(stop, list) and all(type(token) is int for token in stop)):
                raise RequestError("invalid sampling_params: stop_token_ids must be a list of token ids")
            try:
                params = SamplingParams(
                    n=values["n"],
                    temperature=values["temperature"],
                    top_p=values["top_p"],
                    top_k=values["top_k"],
                    max_new_tokens=values["max_new_tokens"],
                    stop_token_ids=tuple(entry.get("stop_token_ids") or ()),
                    seed=entry.get("sampling_seed"),
                )
            except (TypeError, ValueError) as error:
                raise RequestError(f"invalid sampling_params: {error}") from None
            parsed.append((params, entry.get("skip_special_tokens", True) is not False))
        if len({params.n for params, _ in parsed}) > 1:
            raise RequestError("n must be the same for every prompt of a batch")
        return parsed

    def _image_pad_runs(self, input_ids: list[int]) -> list[tuple[int, int]]:
        """(start, end) of the `<|image_pad|>` run of each image block `<|vision_start|> <|image_pad|>+
        <|vision_end|>`, the pattern SGLang's Qwen-VL processor matches."""
        runs = []
        position = 0
        while position < len(input_ids):
            start = position + 1
            if input_ids[position] == self.vision_start_token_id:
                end = start
                while end < len(input_ids) and input_ids[end] == self.image_token_id:
                    end += 1
                if end > start and end < len(input_ids) and input_ids[end] == self.vision_end_token_id:
                    runs.append((start, end))
                position = end
            else:
                position = start
        return runs

    def _sample(self, index: int, input_ids: list[int], image_items: list[Any]) -> Sample:
        """The prompt as LocalEngine takes it: images processed, and each image block's pad run resized to the
        number of `<|image_pad|>` tokens its grid needs (SGLang accepts one pad per image or the expanded run)."""
        runs = self._image_pad_runs(input_ids)
        if len(runs) != len(image_items):
            raise RequestError(f"prompt {index} has {len(runs)} image blocks but {len(image_items)} images")
        if not image_items:
            return Sample(uid=str(index), prompt_ids=list(input_ids))
        try:
            encoded = [
                decode_image_data(
                    item,
                    f"image_data[{index}][{i}]",
                    allowed_dir=self.limits.allowed_image_dir,
                    max_bytes=self.limits.max_image_bytes,
                )
                for i, item in enumerate(image_items)
            ]
            image_inputs = self.images(encoded, [f"image_data[{index}][{i}]" for i in range(len(encoded))])
        except DataError as error:  # a request has no file or row: the field and the problem say it all
            raise RequestError(f"prompt {index}: unusable image ({error.field}): {error.message}") from None
        except (ValueError, OSError) as error:
            raise RequestError(f"prompt {index}: unusable image: {error}") from None
        merge = self.images.geometry.merge_size**2
        prompt_ids: list[int] = []
        cursor = 0
        for (start, end), grid in zip(runs, image_inputs.image_grid_thw, strict=True):
            prompt_ids += input_ids[cursor:start] + [self.image_token_id] * (int(grid.prod()) // merge)
            cursor = end
        prompt_ids += input_ids[cursor:]
        return Sample(uid=str(index), prompt_ids=prompt_ids, image_inputs=image_inputs)

    def _response(
        self, sample: Sample, completion: Sample, params: SamplingParams, skip_special: bool, version: str
    ) -> dict[str, Any]:
        return generate_response(
            completion.response_ids,
            completion.rollout_logprobs,
            "stop" if completion.finish_reason == "stop" else "length",
            matched_token=completion.response_ids[-1] if completion.finish_reason == "stop" else None,
            max_new_tokens=params.max_new_tokens,
            weight_version=version,
            request_id=uuid.uuid4().hex,
            prompt_tokens=len(sample.prompt_ids),
            text=self.tokenizer.decode(completion.response_ids, skip_special_tokens=skip_special),
        )

    @contextlib.contextmanager
    def _generation_slot(self) -> Iterator[None]:
        """Count a running request; wait while a weight-update session is open; refuse while memory is released."""
        with self.state:
            ended = self.state.wait_for(lambda: not self.session_open, timeout=SESSION_WAIT_S)
            if not ended:
                raise RequestError("a weight update has been in progress too long", HTTPStatus.SERVICE_UNAVAILABLE)
            if self.memory_released:
                raise RequestError(
                    "memory occupation is released; call /resume_memory_occupation", HTTPStatus.SERVICE_UNAVAILABLE
                )
            self.running_requests += 1
        try:
            yield
        finally:
            with self.state:
                self.running_requests -= 1
                self.state.notify_all()

    @contextlib.contextmanager
    def _engine_turn(self, client_gone: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold the engine lock; requests wait for it in a bounded queue (503 beyond `max_queued_requests`) and
        leave the queue when their client disconnects."""
        with self.state:
            if self.queued_requests >= self.limits.max_queued_requests:
                raise RequestError(
                    f"the server is busy: {self.queued_requests} requests are already waiting (--max-queued-requests)",
                    HTTPStatus.SERVICE_UNAVAILABLE,
                )
            self.queued_requests += 1
        try:
            while not self.engine_lock.acquire(timeout=LOCK_POLL_S):
                if client_gone():
                    raise ClientGone
        finally:
            with self.state:
                self.queued_requests -= 1
        try:
            yield
        finally:
            self.engine_lock.release()

    # ---- health and information ----

    def health(self, body: Any) -> Reply:
        return Reply(text="")

    def health_generate(self, body: Any) -> Reply:
        """One greedy token from a one-token prompt, as SGLang's health check; 503 when that is impossible. As in
        SGLang, a server that is generating already counts as healthy without the extra token."""
        with self.state:
            if self.running_requests:
                return Reply(text="")
        try:
            with self._generation_slot(), self._engine_turn():
                self.engine.generate(
                    [Sample(uid="health", prompt_ids=[0])], SamplingParams(temperature=0.0, max_new_tokens=1)
                )
        except (RequestError, RolloutError):
            return Reply(status=HTTPStatus.SERVICE_UNAVAILABLE, text="")
        return Reply(text="")

    def model_info(self, body: Any) -> Reply:
        config = self.engine.model.config
        return Reply(
            {
                "model_path": self.model_path,
                "tokenizer_path": self.model_path,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": self.weight_version,
                "has_image_understanding": True,
                "has_audio_understanding": False,
                "model_type": config.model_type,
                "architectures": config.architectures,
            }
        )

    def server_info(self, body: Any) -> Reply:
        return Reply(
            {
                "model_path": self.model_path,
                "tp_size": 1,
                "dp_size": 1,
                "device": str(self.engine.device),
                "version": "prism_mcore",
                "internal_states": [],
            }
        )

    def flush_cache(self, body: Any) -> Reply:
        """LocalEngine keeps no cache between requests; SGLang refuses a flush while requests run, and so do we."""
        with self.state:
            if self.running_requests:
                return Reply(status=HTTPStatus.BAD_REQUEST, text="Cache not flushed: requests are running.\n")
        return Reply(text="Cache flushed.\n")

    # ---- weights ----

    def update_weights_from_disk(self, body: Any) -> Reply:
        request = _object(body, "/update_weights_from_disk")
        model_path = request.get("model_path")
        if not isinstance(model_path, str):
            raise RequestError("model_path (a string) is required")
        try:
            weights = read_hf_weights(model_path)
        except FileNotFoundError as error:
            raise AdminError(str(error)) from None
        with self.engine_lock:
            self._load(weights, request.get("weight_version"))
            self.model_path = model_path
        return Reply({"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0})

    def update_weights_from_tensor(self, body: Any) -> Reply:
        request = _object(body, "/update_weights_from_tensor")
        with self.state:
            if not self.session_open:
                raise AdminError(SESSION_ERROR.format("update_weights_from_tensor"))
        serialized = request.get("serialized_named_tensors")
        if not isinstance(serialized, list) or len(serialized) != 1:
            raise AdminError("serialized_named_tensors must hold one entry per TP rank; this server has tp_size 1")
        named_tensors = deserialize_named_tensors(serialized[0])
        with self.engine_lock:
            self._load(named_tensors, request.get("weight_version"))
        return Reply({"success": True, "message": "Success"})

    def update_weight_version(self, body: Any) -> Reply:
        request = _object(body, "/update_weight_version")
        new_version = request.get("new_version")
        if not isinstance(new_version, str):
            raise AdminError("new_version (a string) is required")
        self._set_version(new_version)
        return Reply(
            {"success": True, "message": f"Weight version updated to {new_version}", "new_version": new_version}
        )

    def _load(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: Any) -> None:
        """Load weights (under the engine lock) and take their version. A load that fails part-way (an unknown
        name, a wrong shape) leaves old and new tensors mixed: the server then reports a version no client expects,
        so none of its completions passes as the old weights', until a complete update."""
        try:
            self.engine.load_weights(named_tensors)
        except Exception:
            self.weight_version = INCOMPLETE_UPDATE
            raise
        self._set_version(version)

    def _set_version(self, version: Any) -> None:
        if version is not None:
            self.weight_version = str(version)

    def begin_weight_update(self, body: Any) -> Reply:
        with self.state:
            if self.session_open:
                raise AdminError("a weight-update session is already open; call end_weight_update() first")
            self.session_open = True
        return Reply({"success": True, "message": "Success"})

    def end_weight_update(self, body: Any) -> Reply:
        with self.state:
            if not self.session_open:
                raise AdminError("no weight-update session is open; call begin_weight_update() first")
            self.session_open = False
            self.state.notify_all()
        return Reply({"success": True, "message": "Success"})

    def init_weights_update_group(self, body: Any) -> Reply:
        """Join the trainer's weight-update group as `rank_offset` (this server has one TP rank); blocks until
        every member has joined, as SGLang's does. On CPU the group must use gloo."""
        request = _object(body, "/init_weights_update_group")
        backend = request.get("backend", "nccl")
        if backend != "gloo" and self.engine.device.type == "cpu":
            raise AdminError(f"backend {backend!r} needs GPUs; this CPU server joins gloo groups only")
        group_name = request.get("group_name", "weight_update_group")
        for key, kind in (("master_address", str), ("master_port", int), ("world_size", int), ("rank_offset", int)):
            if not isinstance(request.get(key), kind) or isinstance(request.get(key), bool):
                raise AdminError(f"{key} ({'a string' if kind is str else 'an integer'}) is required")
        try:
            group = init_weight_update_group(
                request["master_address"],
                request["master_port"],
                request["world_size"],
                request["rank_offset"],
                group_name,
                backend,
                SESSION_WAIT_S,
            )
        except (RuntimeError, ValueError) as error:  # torch's rendezvous and store errors
            raise AdminError(f"Failed to initialize custom process group: {error}.") from None
        self.update_groups[group_name] = group
        return Reply({"success": True, "message": "Succeeded to initialize custom process group."})

    def update_weights_from_distributed(self, body: Any) -> Reply:
        """Receive the announced tensors, broadcast by the trainer (group rank 0) in order, then load them."""
        request = _object(body, "/update_weights_from_distributed")
        with self.state:
            if not self.session_open:
                raise AdminError(SESSION_ERROR.format("update_weights_from_distributed"))
        names, dtypes, shapes = request.get("names"), request.get("dtypes"), request.get("shapes")
        if not all(isinstance(value, list) for value in (names, dtypes, shapes)) or not (
            len(names) == len(dtypes) == len(shapes)
        ):
            raise AdminError("names, dtypes and shapes must be lists of the same length")
        parameters = self.engine.model.state_dict(keep_vars=True)
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            # Checked before anything is allocated: an announced shape decides how much memory the receive takes.
            if not isinstance(name, str) or name not in parameters or shape != list(parameters[name].shape):
                raise AdminError(f"{name!r} with shape {shape!r} is not a parameter of the served model")
            if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
                raise AdminError(f"{name!r}: {dtype!r} is not a torch dtype")
        group = self.update_groups.get(request.get("group_name", "weight_update_group"))
        if group is None:
            raise AdminError(f"no weight-update group {request.get('group_name')!r}; call init_weights_update_group")
        received = []
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.engine.device)
            dist.broadcast(tensor, group=group, group_src=0)
            received.append((name, tensor))
        with self.engine_lock:
            self._load(received, request.get("weight_version"))
        return Reply({"success": True, "message": "Succeeded to update parameter online."})

    def destroy_weights_update_group(self, body: Any) -> Reply:
        group = self.update_groups.pop(_object(body, "/destroy_weights_update_group").get("group_name"), None)
        if group is None:
            raise AdminError("The group to be destroyed does not exist.")
        dist.destroy_process_group(group)
        return Reply({"success": True, "message": "Succeeded to destroy custom process group."})

    # ---- memory ----

    def release_memory_occupation(self, body: Any) -> Reply:
        with self.state:
            if self.running_requests:
                raise RequestError("the server must be idle to release memory occupation")
            self.memory_released = True
        with self.engine_lock:
            self.engine.release_memory()
        return Reply()

    def resume_memory_occupation(self, body: Any) -> Reply:
        with self.engine_lock:
            self.engine.resume_memory()
        with self.state:
            self.memory_released = False
        return Reply()

    def routes(self) -> dict[tuple[str, str], Callable[[Any], Reply]]:
        get_or_post = {
            "/flush_cache": self.flush_cache,
            "/release_memory_occupation": self.release_memory_occupation,
            "/resume_memory_occupation": self.resume_memory_occupation,
        }
        gets = {
            "/health": self.health,
            "/health_generate": self.health_generate,
            "/ready": self.health,
            "/model_info": self.model_info,
            "/get_model_info": self.model_info,
            "/server_info": self.server_info,
            "/get_server_info": self.server_info,
        }
        posts = {
            "/generate": self.generate,
            "/update_weights_from_disk": self.update_weights_from_disk,
            "/update_weights_from_tensor": self.update_weights_from_tensor,
            "/init_weights_update_group": self.init_weights_update_group,
            "/update_weights_from_distributed": self.update_weights_from_distributed,
            "/destroy_weights_update_group": self.destroy_weights_update_group,
            "/update_weight_version": self.update_weight_version,
            "/begin_weight_update": self.begin_weight_update,
            "/end_weight_update": self.end_weight_update,
        }
        routes = {("GET", path): handler for path, handler in {**gets, **get_or_post}.items()}
        routes.update({("POST", path): handler for path, handler in {**posts, **get_or_post}.items()})
        return routes


def _without_logprobs(response: dict[str, Any]) -> dict[str, Any]:
    """A `/generate` answer for a request that did not ask for log-probs (`return_logprob` false)."""
    meta_info = {key: value for key, value in response["meta_info"].items() if key != "output_token_logprobs"}
    return {**response, "meta_info": meta_info}


def _check_type(mapping: dict[str, Any], key: str, kinds: type | tuple[type, ...], prefix: str = "") -> None:
    """Refuse `mapping[key]` (when present and not null) unless it has one of `kinds`; JSON true is not an integer."""
    value = mapping.get(key)
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if value is None or (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)):
        return
    names = "a number" if float in kinds else {int: "an integer", bool: "true or false", str: "a string"}[kinds[0]]
    raise RequestError(f"{prefix}{key} must be {names}, got {json.dumps(value)[:40]}")


def _object(body: Any, path: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"the {path} body must be a JSON object")
    return body


class BodyError(Exception):
    """A request body that cannot be read: the reply is sent and the connection closed (its bytes are not read)."""

    def __init__(self, message: str, status: HTTPStatus) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    """HTTP plumbing: JSON in, a route's `Reply` out, errors in SGLang's shapes."""

    protocol_version = "HTTP/1.1"  # keep-alive, so the client's connection pool is used
    server: _HTTPServer

    def setup(self) -> None:
        # StreamRequestHandler puts this timeout on the socket: an idle connection is closed after it.
        self.timeout = self.server.limits.idle_timeout_s
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            raw = self._read_body(path)
        except BodyError as error:
            self.close_connection = True
            self._send(Reply({"error": {"message": str(error)}}, error.status))
            return
        except (TimeoutError, ConnectionError):
            self.close_connection = True  # the client stopped sending: nobody to answer
            return
        route = self.server.routes.get((method, path))
        if route is None:
            self._send(Reply({"error": {"message": f"no route {method} {path}"}}, HTTPStatus.NOT_FOUND))
            return
        try:
            body = json.loads(raw) if raw else None
            if (method, path) in self.server.cancellable:
                reply = route(body, self._client_gone)
            else:
                reply = route(body)
        except ClientGone:
            self.close_connection = True
            logger.info(f"{method} {path}: the client disconnected; its request was cancelled")
            return
        except json.JSONDecodeError as error:
            reply = Reply({"error": {"message": f"the body is not JSON: {error}"}}, HTTPStatus.BAD_REQUEST)
        except RequestError as error:
            reply = Reply({"error": {"message": str(error)}}, error.status)
        except (AdminError, KeyError, ValueError) as error:  # KeyError: a weight name the model lacks
            message = error.args[0] if error.args else type(error).__name__
            reply = Reply({"success": False, "message": str(message)}, HTTPStatus.BAD_REQUEST)
        except Exception:  # a 500 as SGLang answers it; the details go to the log, not to the client
            logger.exception(f"{method} {path} failed")
            reply = Reply(
                {"error": {"message": "internal server error; see the server log"}}, HTTPStatus.INTERNAL_SERVER_ERROR
            )
        self._send(reply)

    def _read_body(self, path: str) -> bytes:
        """The request body per its `Content-Length`, bounded in size and in time; raises `BodyError`."""
        if self.headers.get("Transfer-Encoding"):
            raise BodyError("chunked request bodies are not supported; send Content-Length", HTTPStatus.BAD_REQUEST)
        declared = self.headers.get("Content-Length")
        if declared is None:
            return b""
        if not declared.strip().isdigit():
            raise BodyError(
                f"Content-Length must be a non-negative integer, got {declared[:40]!r}", HTTPStatus.BAD_REQUEST
            )
        length = int(declared)
        limits = self.server.limits
        limit = limits.max_weights_body_bytes if path == "/update_weights_from_tensor" else limits.max_body_bytes
        if length > limit:
            flag = "--max-weights-body-mb" if path == "/update_weights_from_tensor" else "--max-body-mb"
            raise BodyError(
                f"the body is {length} bytes; this server takes at most {limit} ({flag})",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        deadline = time.monotonic() + BODY_DEADLINE_S
        chunks = []
        remaining = length
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError
            chunk = self.rfile.read1(min(remaining, MiB))
            if not chunk:
                raise ConnectionError
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _client_gone(self) -> bool:
        """Whether the client closed its end: the socket is readable but holds no byte (a pipelined next request
        would hold some). Costs one `select` per call."""
        connection: socket.socket = self.connection
        try:
            readable, _, _ = select.select([connection], [], [], 0)
            return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _send(self, reply: Reply) -> None:
        if reply.text is not None:
            data, content_type = reply.text.encode(), "text/plain; charset=utf-8"
        else:
            data, content_type = json.dumps(reply.body).encode(), "application/json"
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server signature)
        logger.debug(f"{self.address_string()} {format % args}")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # requests in flight do not keep a stopped server's process alive
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], rollout: RolloutServer) -> None:
        super().__init__(address, _Handler)
        self.limits = rollout.limits
        self.routes = rollout.routes()
        self.cancellable = {("POST", "/generate")}  # routes that take a `client_gone` callback


def serve(rollout: RolloutServer, host: str = "127.0.0.1", port: int = 0) -> _HTTPServer:
    """An HTTP server for `rollout` bound to `host:port` (0: a free port); call `serve_forever()` on it."""
    return _HTTPServer((host, port), rollout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prism_mcore.rollout.server", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-path", required=True, help="HF Qwen3-VL checkpoint folder (model, tokenizer, processor)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=30000, help="port to bind; 0 picks a free one (default: 30000)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (default: cpu)")
    parser.add_argument("--weight-version", default="default", help="label of the initial weights, as SGLang's")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    defaults = ServerLimits()
    parser.add_argument(
        "--allowed-image-dir",
        type=Path,
        default=None,
        help="folder whose files image_data may name by path; without it, local paths are refused",
    )
    parser.add_argument(
        "--max-image-mb", type=float, default=defaults.max_image_bytes / MiB, help="largest encoded image (default: 32)"
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=defaults.max_image_pixels,
        help="largest image in width*height, checked before decoding (default: 8192*8192)",
    )
    parser.add_argument(
        "--max-body-mb", type=float, default=defaults.max_body_bytes / MiB, help="largest request body (default: 256)"
    )
    parser.add_argument(
        "--max-weights-body-mb",
        type=float,
        default=defaults.max_weights_body_bytes / MiB,
        help="largest /update_weights_from_tensor body (default: 4096)",
    )
    parser.add_argument(
        "--idle-timeout-s",
        type=float,
        default=defaults.idle_timeout_s,
        help="close a connection that sends nothing for this long (default: 60)",
    )
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=defaults.max_queued_requests,
        help="requests that may wait for the engine; more are answered 503 (default: 256)",
    )
    args = parser.parse_args(argv)
    if args.allowed_image_dir is not None and not args.allowed_image_dir.is_dir():
        parser.error(f"--allowed-image-dir {args.allowed_image_dir} is not a folder")
    limits = ServerLimits(
        allowed_image_dir=args.allowed_image_dir,
        max_image_bytes=int(args.max_image_mb * MiB),
        max_image_pixels=args.max_image_pixels,
        max_body_bytes=int(args.max_body_mb * MiB),
        max_weights_body_bytes=int(args.max_weights_body_mb * MiB),
        idle_timeout_s=args.idle_timeout_s,
        max_queued_requests=args.max_queued_requests,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    rollout = RolloutServer(args.model_path, device=args.device, weight_version=args.weight_version, limits=limits)
    http_server = serve(rollout, args.host, args.port)
    host, port = http_server.server_address[:2]
    # Launchers and tests read this line to learn the port when --port 0 was given.
    loaded_s = time.monotonic() - started
    print(
        f"prism_mcore rollout server listening on http://{host}:{port} (model loaded in {loaded_s:.1f} s)", flush=True
    )
    try:
        http_server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        http_server.server_close()


if __name__ == "__main__":
    main()
