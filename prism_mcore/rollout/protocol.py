"""SGLang 0.5.23's HTTP protocol as prism_mcore speaks it: `/generate` payloads and responses, image data, and the
serialised tensors of `/update_weights_from_tensor`.

The client (`SGLangEngine`, `weight_sync`) and the project's own server (`rollout.server`) both use these functions,
so the two sides cannot drift apart; a test checks the payloads against SGLang's own request schema where the sglang
package can be imported. Field names and meanings follow SGLang exactly:

- request: `input_ids` (the prompt, image placeholders included), `image_data` (a list of `data:<mime>;base64,...`
  URIs, one per image of the prompt), `sampling_params` (SGLang's key names), `return_logprob: true` and
  `logprob_start_len: -1` (log-probs of the output tokens only);
- response: `output_ids` (the stop token included), `meta_info.output_token_logprobs` as `[logprob, token_id, text]`
  entries aligned with `output_ids`, `meta_info.finish_reason` (`{"type": "stop", "matched": ...}`,
  `{"type": "length", "length": N}` or `{"type": "abort", "message": ...}`), `meta_info.weight_version` (a string).

A response that does not have this shape raises `ProtocolError` naming the server and the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401 (registers torch's tensor reductions with ForkingPickler)

from prism_mcore.data.images import DEFAULT_MAX_IMAGE_BYTES, ImageSourceError, read_image_file
from prism_mcore.record import Sample
from prism_mcore.rollout.base import FinishReason, RolloutError, SamplingParams

# Leading bytes of the image formats the Qwen processor reads, for the MIME type of a data URI.
_IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


class ProtocolError(RolloutError):
    """A server's answer does not follow the SGLang protocol; names the server and the offending field."""

    def __init__(self, server: str, field: str, problem: str) -> None:
        super().__init__(f"malformed response from {server}: {field} {problem}")
        self.server = server
        self.field = field


@dataclass(frozen=True)
class Completion:
    """One parsed `/generate` answer."""

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason | None  # None: the server aborted the request (retryable)
    weight_version: str
    abort_message: str = ""


def image_mime_type(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for signature, mime in _IMAGE_SIGNATURES:
        if data.startswith(signature):
            return mime
    return "application/octet-stream"


def image_data_uri(data: bytes) -> str:
    """An encoded image file as the `data:` URI SGLang's `image_data` accepts."""
    return f"data:{image_mime_type(data)};base64,{base64.b64encode(data).decode('ascii')}"


LOCAL_IMAGE_REFUSED = (
    "local image paths are read only inside the folder the server was started with (--allowed-image-dir), and "
    "only regular files there"
)


def decode_image_data(
    item: Any, field: str, *, allowed_dir: Path | None = None, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> bytes:
    """The encoded image an `image_data` item names: a `data:` URI or bare base64 and, when `allowed_dir` is given,
    a `file://` URL or a path of a regular file inside that folder (symlinks resolved first). Every image is at most
    `max_bytes`.

    Raises `ValueError` naming `field` for anything else: http(s) URLs (the server runs offline), and local paths
    when no folder is allowed or the path leads outside it. A refused path gets the same answer whether or not the
    file exists, so requests cannot probe the server's filesystem.
    """
    if isinstance(item, dict) and "url" in item:
        item = item["url"]
    if not isinstance(item, str) or not item:
        raise ValueError(f"{field} must be a data URI, base64 string or file path, got {type(item).__name__}")
    if item.startswith(("http://", "https://")):
        raise ValueError(f"{field}: this server does not fetch URLs; send the image as a data URI")
    if item.startswith("data:"):
        return _base64_image(item.partition(",")[2], field, max_bytes)
    if item.startswith("file://"):
        return _local_image(item.removeprefix("file://"), field, allowed_dir, max_bytes)
    try:
        return _base64_image(item, field, max_bytes)
    except binascii.Error:
        if allowed_dir is not None:
            return _local_image(item, field, allowed_dir, max_bytes)
        raise ValueError(f"{field} is neither a data URI nor valid base64; {LOCAL_IMAGE_REFUSED}") from None


def _base64_image(text: str, field: str, max_bytes: int) -> bytes:
    """Decode base64 (raises `binascii.Error`), refusing text that would decode to more than `max_bytes`."""
    if len(text) // 4 * 3 > max_bytes + 2:
        raise ValueError(f"{field}: the image is over the {max_bytes}-byte limit")
    return base64.b64decode(text, validate=True)


def _local_image(path: str, field: str, allowed_dir: Path | None, max_bytes: int) -> bytes:
    if allowed_dir is None:
        raise ValueError(f"{field}: {LOCAL_IMAGE_REFUSED}")
    root = allowed_dir.resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"{field}: {LOCAL_IMAGE_REFUSED}")
    try:
        return read_image_file(resolved, max_bytes)
    except ImageSourceError:
        raise ValueError(f"{field}: {LOCAL_IMAGE_REFUSED}") from None


def sglang_sampling_params(params: SamplingParams, seed: int | None = None) -> dict[str, Any]:
    """`sampling_params` for one completion, with SGLang's key names (SGLang rejects unknown keys)."""
    sampling = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
    }
    if params.stop_token_ids:
        sampling["stop_token_ids"] = list(params.stop_token_ids)
    if seed is not None:
        sampling["sampling_seed"] = seed
    return sampling


def generate_payload(sample: Sample, sampling_params: dict[str, Any]) -> dict[str, Any]:
    """The `/generate` body for one completion of `sample`'s prompt."""
    payload: dict[str, Any] = {
        "input_ids": list(sample.prompt_ids),
        "sampling_params": sampling_params,
        "return_logprob": True,
        "logprob_start_len": -1,
    }
    if sample.images:
        payload["image_data"] = [image_data_uri(image) for image in sample.images]
    return payload


def _field(mapping: Any, key: str, server: str, path: str) -> Any:
    if not isinstance(mapping, dict):
        raise ProtocolError(server, path, f"must be a JSON object, got {type(mapping).__name__}")
    if key not in mapping:
        raise ProtocolError(server, f"{path}.{key}", "is missing")
    return mapping[key]


def parse_generate_response(body: Any, server: str) -> Completion:
    """Check and read one completion from a `/generate` response body (for a single, non-streamed request)."""
    output_ids = _field(body, "output_ids", server, "response")
    if not isinstance(output_ids, list) or not all(type(token) is int for token in output_ids):
        raise ProtocolError(server, "output_ids", "must be a list of token ids")
    meta_info = _field(body, "meta_info", server, "response")
    weight_version = _field(meta_info, "weight_version", server, "meta_info")
    if not isinstance(weight_version, str):
        raise ProtocolError(server, "meta_info.weight_version", f"must be a string, got {weight_version!r}")
    finish = _field(meta_info, "finish_reason", server, "meta_info")
    finish_type = _field(finish, "type", server, "meta_info.finish_reason")
    if finish_type == "abort":
        message = finish.get("message") or ""
        return Completion([], [], None, weight_version, abort_message=str(message))
    if finish_type not in ("stop", "length"):
        raise ProtocolError(
            server, "meta_info.finish_reason.type", f"must be stop, length or abort, got {finish_type!r}"
        )
    entries = _field(meta_info, "output_token_logprobs", server, "meta_info")
    if not isinstance(entries, list) or len(entries) != len(output_ids):
        count = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ProtocolError(
            server,
            "meta_info.output_token_logprobs",
            f"must hold one entry per output token ({len(output_ids)}), got {count}",
        )
    logprobs = []
    for position, (entry, token) in enumerate(zip(entries, output_ids, strict=True)):
        field = f"meta_info.output_token_logprobs[{position}]"
        if not isinstance(entry, list) or len(entry) < 2:
            raise ProtocolError(server, field, f"must be a [logprob, token_id, text] entry, got {entry!r}")
        logprob, entry_token = entry[0], entry[1]
        if entry_token != token:
            raise ProtocolError(server, field, f"is for token {entry_token!r} but output_ids[{position}] is {token}")
        if isinstance(logprob, bool) or not isinstance(logprob, (int, float)) or math.isnan(logprob):
            raise ProtocolError(server, field, f"has log-prob {logprob!r}, not a number")
        logprobs.append(float(logprob))
    return Completion(output_ids, logprobs, finish_type, weight_version)


def generate_response(
    output_ids: Sequence[int],
    logprobs: Sequence[float],
    finish_reason: FinishReason,
    *,
    matched_token: int | None,
    max_new_tokens: int,
    weight_version: str,
    request_id: str,
    prompt_tokens: int,
    text: str,
) -> dict[str, Any]:
    """A `/generate` answer for one completion, as SGLang 0.5.23 writes it (the server's side of the protocol)."""
    if finish_reason == "stop":
        finish = {"type": "stop", "matched": matched_token}
    else:
        finish = {"type": "length", "length": max_new_tokens}
    return {
        "text": text,
        "output_ids": list(output_ids),
        "meta_info": {
            "id": request_id,
            "finish_reason": finish,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(output_ids),
            "cached_tokens": 0,
            "weight_version": weight_version,
            "output_token_logprobs": [
                [logprob, token, None] for logprob, token in zip(logprobs, output_ids, strict=True)
            ],
        },
    }


def tensor_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Rebuild a CPU tensor from its raw bytes (the unpickling side of `_ByValuePickler`)."""
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)


class _ByValuePickler(pickle.Pickler):
    """Pickles CPU tensors as (raw bytes, dtype, shape), rebuilt by `tensor_from_bytes`.

    torch's own tensor pickling depends on the sending process (Megatron, for one, replaces the storage loader with
    its own function), so a receiver could not tell what it is allowed to unpickle; this form needs one function.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            flat = obj.detach().cpu().contiguous().reshape(-1)
            data = flat.view(torch.uint8).numpy().tobytes()
            return tensor_from_bytes, (data, str(obj.dtype).removeprefix("torch."), tuple(obj.shape))
        return NotImplemented


def serialize_named_tensors(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """One `serialized_named_tensors` entry (for one server TP rank): base64 of a pickled `[(name, tensor)]` list.

    CUDA tensors are pickled with torch's ForkingPickler, as SGLang expects: the pickle carries CUDA IPC handles,
    not data, so the server must run on the same host and the tensors must stay alive until it has loaded them.
    CPU tensors travel by value (`_ByValuePickler`; ForkingPickler would send shared-memory handles that an
    unrelated process cannot open), which the project's CPU server reads.
    """
    buffer = io.BytesIO()
    if any(tensor.is_cuda for _, tensor in named_tensors):
        ForkingPickler(buffer).dump(list(named_tensors))
    else:
        _ByValuePickler(buffer).dump(list(named_tensors))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class _TensorListUnpickler(pickle.Unpickler):
    """Unpickles only what `_ByValuePickler` writes: lists of (name, tensor) pairs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) != (__name__, tensor_from_bytes.__name__):
            raise pickle.UnpicklingError(f"serialized_named_tensors may not refer to {module}.{name}")
        return tensor_from_bytes


def deserialize_named_tensors(serialized: str) -> list[tuple[str, torch.Tensor]]:
    """The inverse of `serialize_named_tensors` for CPU tensors (the server's side); raises `ValueError`."""
    try:
        named_tensors = _TensorListUnpickler(io.BytesIO(base64.b64decode(serialized, validate=True))).load()
    except (binascii.Error, pickle.UnpicklingError, EOFError) as error:
        raise ValueError(f"serialized_named_tensors is not a base64 pickled tensor list ({error})") from None
    if not isinstance(named_tensors, list) or not all(
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)
        for item in named_tensors
    ):
        raise ValueError("serialized_named_tensors must decode to a list of (name, tensor) pairs")
    return named_tensors
