"""The SGLang wire format: sampling keys, /generate payloads and their images, response parsing (malformed answers
name the server and field), serialised tensors; and, where sglang is importable, every payload the client and the
weight sync send checked by SGLang 0.5.23's own request classes."""

from __future__ import annotations

import base64
import io
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from prism_mcore.record import Sample
from prism_mcore.rollout import SamplingParams
from prism_mcore.rollout.protocol import (
    ProtocolError,
    decode_image_data,
    deserialize_named_tensors,
    generate_payload,
    generate_response,
    image_data_uri,
    parse_generate_response,
    serialize_named_tensors,
    sglang_sampling_params,
)
from prism_mcore.rollout.weight_sync import DistributedWeightSync, TensorWeightSync
from tests.rollout_support import requires_sglang, sglang_schema_errors

SERVER = "http://127.0.0.1:30000"


def _png(width: int = 32, height: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _response(**meta_changes: Any) -> dict[str, Any]:
    response = generate_response(
        [7, 8, 2],
        [-0.1, -1.5, -0.01],
        "stop",
        matched_token=2,
        max_new_tokens=16,
        weight_version="3",
        request_id="abc",
        prompt_tokens=5,
        text="hi",
    )
    response["meta_info"].update(meta_changes)
    return response


def test_sampling_params_use_sglang_keys() -> None:
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=64, stop_token_ids=(2, 3))
    assert sglang_sampling_params(params, seed=11) == {
        "max_new_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "stop_token_ids": [2, 3],
        "sampling_seed": 11,
    }
    assert set(sglang_sampling_params(SamplingParams())) == {"max_new_tokens", "temperature", "top_p", "top_k"}


def test_generate_payload_carries_prompt_images_and_logprob_request() -> None:
    png = _png()
    payload = generate_payload(Sample(uid="u", prompt_ids=[1, 2, 3], images=[png]), {"max_new_tokens": 4})
    assert payload == {
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": 4},
        "return_logprob": True,
        "logprob_start_len": -1,
        "image_data": [image_data_uri(png)],
    }
    assert payload["image_data"][0].startswith("data:image/png;base64,")
    assert "image_data" not in generate_payload(Sample(uid="t", prompt_ids=[1]), {})


def test_image_data_items_decode_from_every_accepted_form(tmp_path: Path) -> None:
    png = _png()
    (tmp_path / "image.png").write_bytes(png)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    assert image_data_uri(jpeg.getvalue()).startswith("data:image/jpeg;base64,")
    for item in (
        image_data_uri(png),
        base64.b64encode(png).decode(),
        str(tmp_path / "image.png"),
        "image.png",  # relative to the allowed folder
        f"file://{tmp_path / 'image.png'}",
        {"url": image_data_uri(png)},
    ):
        assert decode_image_data(item, "image_data[0]", allowed_dir=tmp_path) == png
    with pytest.raises(ValueError, match=r"image_data\[1\]: this server does not fetch URLs"):
        decode_image_data("https://example.com/a.png", "image_data[1]")
    with pytest.raises(ValueError, match=r"image_data\[2\] is neither a data URI nor valid base64"):
        decode_image_data("not an image!", "image_data[2]")


def test_local_image_paths_are_refused_outside_the_allowed_folder(tmp_path: Path) -> None:
    """Without an allowed folder no path is read; with one, only regular files inside it (after resolving
    symlinks). Every refusal reads the same whether the file exists or not, so a client cannot probe the disk."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png())
    (allowed / "link.png").symlink_to(outside / "secret.png")
    os.mkfifo(allowed / "fifo.png")
    answers = {}
    for name, item, allowed_dir in [
        ("existing, no folder", f"file://{outside / 'secret.png'}", None),
        ("missing, no folder", f"file://{outside / 'missing.png'}", None),
        ("bare existing path, no folder", str(outside / "secret.png"), None),
        ("bare missing path, no folder", str(outside / "missing.png"), None),
        ("existing outside", str(outside / "secret.png"), allowed),
        ("missing outside", str(outside / "missing.png"), allowed),
        ("dot-dot escape", "../outside/secret.png", allowed),
        ("symlink out of the folder", "link.png", allowed),
        ("FIFO inside", "fifo.png", allowed),
        ("device", "file:///dev/zero", allowed),
    ]:
        with pytest.raises(ValueError) as refused:
            decode_image_data(item, "image_data[0]", allowed_dir=allowed_dir)
        answers[name] = str(refused.value).replace("is neither a data URI nor valid base64;", ":")
        assert "--allowed-image-dir" in answers[name], name
    assert len({message.replace(" :", ":") for message in answers.values()}) == 1, answers


def test_image_data_over_the_byte_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    png = _png()
    (tmp_path / "image.png").write_bytes(png)
    assert decode_image_data(image_data_uri(png), "image_data[0]", max_bytes=len(png)) == png
    for item in (image_data_uri(png), base64.b64encode(png).decode(), "image.png"):
        with pytest.raises(ValueError, match=r"image_data\[0\]"):
            decode_image_data(item, "image_data[0]", allowed_dir=tmp_path, max_bytes=len(png) - 8)


def test_generate_response_parses_back() -> None:
    completion = parse_generate_response(_response(), SERVER)
    assert completion.output_ids == [7, 8, 2] and completion.logprobs == [-0.1, -1.5, -0.01]
    assert completion.finish_reason == "stop" and completion.weight_version == "3"
    length = parse_generate_response(_response(finish_reason={"type": "length", "length": 3}), SERVER)
    assert length.finish_reason == "length"
    aborted = parse_generate_response(_response(finish_reason={"type": "abort", "message": "update"}), SERVER)
    assert aborted.finish_reason is None and aborted.abort_message == "update"


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ([_response()], "response", "must be a JSON object"),
        ({"meta_info": {}}, "response.output_ids", "is missing"),
        ({**_response(), "output_ids": [1, "x"]}, "output_ids", "must be a list of token ids"),
        (_response(weight_version=3), "meta_info.weight_version", "must be a string"),
        (_response(finish_reason=None), "meta_info.finish_reason", "must be a JSON object"),
        (_response(finish_reason={"type": "eos"}), "meta_info.finish_reason.type", "must be stop, length or abort"),
        (_response(output_token_logprobs=[[-0.1, 7, None]]), "meta_info.output_token_logprobs", "got 1"),
        (
            _response(output_token_logprobs=[[-0.1, 7, None], [-1.5, 9, None], [-0.01, 2, None]]),
            "meta_info.output_token_logprobs[1]",
            "is for token 9 but output_ids[1] is 8",
        ),
        (
            _response(output_token_logprobs=[[-0.1, 7, None], [None, 8, None], [-0.01, 2, None]]),
            "meta_info.output_token_logprobs[1]",
            "not a number",
        ),
    ],
)
def test_malformed_responses_name_the_server_and_field(body: Any, field: str, problem: str) -> None:
    with pytest.raises(ProtocolError, match="malformed response") as error:
        parse_generate_response(body, SERVER)
    assert error.value.server == SERVER and error.value.field == field
    assert str(error.value).startswith(f"malformed response from {SERVER}: {field} ")
    assert problem in str(error.value)


def test_cpu_tensors_round_trip_by_value() -> None:
    named = [("a.weight", torch.randn(3, 4)), ("b.bias", torch.randn(5).to(torch.bfloat16))]
    restored = deserialize_named_tensors(serialize_named_tensors(named))
    assert [name for name, _ in restored] == ["a.weight", "b.bias"]
    for (_, original), (_, copy) in zip(named, restored, strict=True):
        assert copy.dtype == original.dtype and torch.equal(copy, original)


def test_tensor_payloads_refuse_anything_but_tensor_lists() -> None:
    class Exploit:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return os.system, ("true",)

    with pytest.raises(ValueError, match="may not refer to .*system"):
        deserialize_named_tensors(base64.b64encode(pickle.dumps([("x", Exploit())])).decode())
    with pytest.raises(ValueError, match="list of \\(name, tensor\\) pairs"):
        deserialize_named_tensors(base64.b64encode(pickle.dumps({"x": 1})).decode())


@requires_sglang
def test_payloads_pass_sglang_request_validation() -> None:
    named = [("model.language_model.norm.weight", torch.ones(4))]
    distributed = DistributedWeightSync(master_address="127.0.0.1", master_port=29600)
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8, stop_token_ids=(2,))
    requests = {
        "/generate": [
            generate_payload(Sample("u", [1, 2], images=[_png()]), sglang_sampling_params(params, seed=3)),
            generate_payload(Sample("t", [1, 2]), sglang_sampling_params(SamplingParams())),
        ],
        "/update_weights_from_tensor": [
            TensorWeightSync.payload(named, tp_size=2, version="5"),
            TensorWeightSync.payload(named, tp_size=1, version=None),
        ],
        "/update_weights_from_disk": [{"model_path": "/ckpt/weights_v5", "weight_version": "5", "flush_cache": False}],
        "/init_weights_update_group": distributed.init_payloads([2, 1]),
        "/update_weights_from_distributed": [distributed.update_payload(named, "5")],
        "/destroy_weights_update_group": [{"group_name": distributed.group_name}],
        "/update_weight_version": [{"new_version": "5", "abort_all_requests": False}],
        "/begin_weight_update": [{}],
        "/end_weight_update": [{}],
        "/release_memory_occupation": [{}],
        "/resume_memory_occupation": [{}],
    }
    items = [{"endpoint": path, "request": body} for path, bodies in requests.items() for body in bodies]
    items.append({"endpoint": "/generate", "response": _response()})
    # The validator must catch what SGLang rejects, or passing means nothing.
    items.append({"endpoint": "/generate", "request": {"input_ids": [1], "sampling_params": {"seed": 3}}})
    items.append({"endpoint": "/update_weights_from_disk", "request": {"weight_version": "5"}})
    errors = sglang_schema_errors(items)
    assert errors[:-2] == [None] * (len(items) - 2), errors
    assert "unknown field `seed`" in errors[-2] and "model_path" in errors[-1]
