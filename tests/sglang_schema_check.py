"""Validate HTTP payloads with SGLang 0.5.23's own request and response classes (run as a subprocess).

    python -m tests.sglang_schema_check < items.json

`items.json` is a list of `{"endpoint": "/generate", "request": {...}}` or `{"endpoint": "/generate", "response": ...}`;
the output is a JSON list with, per item, null (valid) or the error SGLang would report. Requests are checked as
SGLang's HTTP server checks them: pydantic validation of the endpoint's request class (what FastAPI does), then for
`/generate` the JSON contract gate, batch normalisation and `SamplingParams` construction, normalisation and
verification. Responses of `/generate` are decoded with the schema's `GenerateResponse`.

It runs in its own process because importing `sglang.srt` on a CPU machine needs stand-in `torchvision` modules,
which would mislead transformers in any process that also processes images.
"""

from __future__ import annotations

import enum
import importlib.machinery
import json
import sys
import types
from typing import Any

VOCAB_SIZE = 1 << 20  # token ids of the tests are far below; `verify` only checks ids against it


def _stub_torchvision() -> None:
    """sglang.srt imports transformers' image utilities, which require torchvision for `AutoImageProcessor`; the CPU
    torch has none that works (see the SGLang notes). The classes validated here never use it."""

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BOX = "box"
        BILINEAR = "bilinear"
        HAMMING = "hamming"
        BICUBIC = "bicubic"
        LANCZOS = "lanczos"

    modules = {
        "torchvision": {"__version__": "0.0.0"},
        "torchvision.io": {"ImageReadMode": None, "decode_image": None},
        "torchvision.transforms": {"InterpolationMode": InterpolationMode},
        "torchvision.transforms.functional": {"InterpolationMode": InterpolationMode, "pil_to_tensor": None},
        "torchvision.transforms.v2": {},
        "torchvision.transforms.v2.functional": {},
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__path__ = []
        module.__dict__.update(attributes)
        sys.modules[name] = module


def main() -> None:
    _stub_torchvision()
    from pydantic import TypeAdapter
    from sglang.api.v1.api_types import GenerateResponse
    from sglang.srt.entrypoints.api_contract import generate_contract_error
    from sglang.srt.managers import io_struct
    from sglang.srt.sampling.sampling_params import SamplingParams

    request_classes = {
        "/generate": io_struct.GenerateReqInput,
        "/update_weights_from_disk": io_struct.UpdateWeightFromDiskReqInput,
        "/update_weights_from_tensor": io_struct.UpdateWeightsFromTensorReqInput,
        "/update_weights_from_distributed": io_struct.UpdateWeightsFromDistributedReqInput,
        "/init_weights_update_group": io_struct.InitWeightsUpdateGroupReqInput,
        "/destroy_weights_update_group": io_struct.DestroyWeightsUpdateGroupReqInput,
        "/update_weight_version": io_struct.UpdateWeightVersionReqInput,
        "/begin_weight_update": io_struct.BeginWeightUpdateReqInput,
        "/end_weight_update": io_struct.EndWeightUpdateReqInput,
        "/release_memory_occupation": io_struct.ReleaseMemoryOccupationReqInput,
        "/resume_memory_occupation": io_struct.ResumeMemoryOccupationReqInput,
    }

    def check_request(endpoint: str, payload: dict[str, Any]) -> None:
        request = TypeAdapter(request_classes[endpoint]).validate_python(payload)
        if endpoint != "/generate":
            return
        error = generate_contract_error(payload)
        if error is not None:
            raise ValueError(error)
        request.normalize_batch_and_arguments()
        sampling = request.sampling_params if isinstance(request.sampling_params, list) else [request.sampling_params]
        for entry in sampling:
            params = SamplingParams(**entry)
            params.normalize(None)
            params.verify(VOCAB_SIZE)

    results: list[str | None] = []
    for item in json.load(sys.stdin):
        try:
            if "request" in item:
                check_request(item["endpoint"], item["request"])
            else:
                responses = item["response"] if isinstance(item["response"], list) else [item["response"]]
                for response in responses:
                    GenerateResponse.from_json_value(response)
            results.append(None)
        except Exception as error:  # every failure is a finding to report, whatever its type
            results.append(f"{type(error).__name__}: {error}")
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
