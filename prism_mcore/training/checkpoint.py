"""Model weights in Megatron's distributed checkpoint format (torch_dist), for the policy and the discriminator.

A checkpoint folder holds every rank's shards under layout-independent keys, so it loads into any TP/PP/EP layout
(saved at TP=2, loaded at TP=1, ...: tests/distributed/test_models_parallel.py). The discriminator's value head is
saved under `language_model.output_layer.weight` like any replicated weight (models/discriminator.py).

`model_sharded_state` is the model part of a sharded state dict: a resumable checkpoint
(`training.resume.CheckpointManager`, which also makes the writes atomic) adds optimizer, scheduler, RNG and
data-position state next to it in the same `dist_checkpointing.save` call.

Loading never runs code from the checkpoint: `dist_load` reads torch_dist's pickled `.metadata` with an unpickler that
admits only the checkpoint-metadata records, and its non-tensor values with `torch.load(weights_only=True)`
(PyTorch's reader would unpickle both without limits). `dist_save` starts no helper process: Megatron's writer
reports its results through a queue it would otherwise create as a `multiprocessing.Manager` server, a process that
outlives a killed trainer; our saves are synchronous, so an in-process queue carries them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import io
import pickle
import queue
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model

from prism_mcore.models.build import ModelHandle

Models = ModelHandle | Sequence[torch.nn.Module]


def _chunks(models: Models) -> list[torch.nn.Module]:
    """The bare model chunks, under any DDP / Float16Module wrapping (checkpoint keys do not depend on it)."""
    chunks = models.chunks if isinstance(models, ModelHandle) else list(models)
    return unwrap_model(chunks)


def _chunk_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"  # Megatron's convention for virtual pipeline chunks


def model_sharded_state(models: Models) -> dict[str, Any]:
    """`{"model": sharded state}` (or `model0`, `model1`, ... per virtual pipeline chunk) of these chunks."""
    chunks = _chunks(models)
    return {_chunk_key(i, len(chunks)): chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def load_model_state(models: Models, loaded: dict[str, Any]) -> None:
    """Load the model part of a loaded sharded state (keyed as `model_sharded_state` keys it) into these chunks,
    strictly."""
    chunks = _chunks(models)
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[_chunk_key(index, len(chunks))], strict=True)


def dist_save(state: dict[str, Any], directory: str | Path) -> None:
    """`dist_checkpointing.save` (collective) without a helper process (see the module docstring)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(state, str(directory))


def dist_load(state: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """`dist_checkpointing.load` (collective) that refuses, instead of running, code planted in the checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException

    with _no_code_from_checkpoints():
        try:
            return dist_checkpointing.load(state, str(directory))
        except CheckpointException as error:  # a BaseException: name the refusal in one line instead
            refused = [exc for exc, _ in error.failures.values() if isinstance(exc, pickle.UnpicklingError)]
            if not refused:
                raise
            raise pickle.UnpicklingError(f"{directory}: refused to unpickle ({refusal_reason(refused[0])})") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles what torch_dist writes as `.metadata`: PyTorch's checkpoint-metadata dataclasses and enums, shapes,
    dtypes and layouts. Anything else (a function, `os.system`, any other class) is refused."""

    _MODULES = (
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.planner",
        "torch.distributed.checkpoint.filesystem",
    )

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES and "." not in name:
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout  # maps a layout's name to the layout
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"checkpoint metadata may not refer to {module}.{name}")


def refusal_reason(error: pickle.UnpicklingError) -> str:
    """What a `torch.load(weights_only=True)` refusal refused, in a few words (its message is mostly advice on
    loading the file anyway)."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return f"it refers to {refused.group(1)}" if refused else (str(error).splitlines() or [type(error).__name__])[0]


def _read_metadata(stream: Any, path: Any) -> Any:
    try:
        return _MetadataUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise pickle.UnpicklingError(f"{Path(path).name}: {error}") from None


def check_dist_metadata(path: str | Path) -> None:
    """Read a torch_dist `.metadata` file as `dist_load` would: pickle.UnpicklingError if it is truncated or holds
    anything but checkpoint metadata."""
    with open(path, "rb") as stream:
        _read_metadata(stream, path)


@contextlib.contextmanager
def _no_code_from_checkpoints() -> Iterator[None]:
    """Swap PyTorch's two unrestricted unpicklings in dist-checkpoint loading for restricted ones, for the duration
    (process-wide: checkpoints load on the main thread, while no other thread loads one)."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    def read_metadata(reader: FileSystemReader, *args: Any, **kwargs: Any) -> Any:
        path = reader._get_metadata_path(kwargs.get("rank"))
        with reader.fs.create_stream(path, "rb") as stream:
            metadata = _read_metadata(stream, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = reader.load_id
        return metadata

    def load_bytes(planner: DefaultLoadPlanner, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if planner.flatten_state_dict:
            set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], loaded)
        else:
            planner.state_dict[read_item.dest_index.fqn] = loaded

    saved = (FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes)
    FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes = read_metadata, load_bytes
    try:
        yield
    finally:
        FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes = saved
