"""HF export: a stream of `(hf_name, tensor)` pairs, and HF checkpoint folders written from it.

`iter_hf_weights` is what rollout engines consume after every policy update (the LocalEngine loads the pairs into
its transformers model; the SGLang client sends them to the servers' weight-update endpoints). Megatron-Bridge
gathers each tensor from its tensor-parallel shards and broadcasts it from the pipeline stage (and expert-parallel
rank) that holds it, so every rank sees every full tensor, one at a time: peak extra memory is one tensor, not the
model. The names and layouts are those of the source checkpoint (fused experts stay fused), and an import/export
round trip reproduces the source tensors bit for bit (tests/unit/models/test_export.py). For the discriminator the
stream carries the backbone and `v_head.1.weight` (`models/discriminator.py`).

`save_hf` writes a self-contained HF folder: the exported tensors (safetensors shards), and the config, tokenizer,
processor, chat template and generation config copied from the source folder; transformers loads it with the same
logits as the Megatron model. It is written to `<folder>.tmp` and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from prism_mcore.models.build import ModelHandle

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def iter_hf_weights(handle: ModelHandle, *, cpu: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream every weight of the model as `(hf_name, full tensor)`, on every rank (a collective: all ranks of the
    model-parallel group must consume the whole stream). `cpu=False` keeps tensors on the GPU, for NCCL broadcast
    or CUDA-IPC weight updates."""
    stream = handle.bridge.stream_weights_megatron_to_hf(
        handle.chunks, handle.hf_pretrained, cpu=cpu, show_progress=False
    )
    yield from stream  # HFWeightTuple: a (name, tensor) named tuple


def save_hf(handle: ModelHandle, folder: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the model as an HF checkpoint folder (collective; rank 0 writes). Returns the folder."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".tmp")
    writer = dist.get_rank() == 0 if dist.is_initialized() else True
    dtype = _checkpoint_dtype(handle)
    shards = _ShardWriter(staging, max_shard_bytes) if writer else None
    if writer:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for item in sorted(handle.hf_path.iterdir()):
            if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name not in _WEIGHT_INDEXES:
                shutil.copy2(item, staging / item.name)
    for name, tensor in iter_hf_weights(handle):
        if shards is not None:
            shards.add(name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
    if shards is not None:
        shards.close()
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    if dist.is_initialized():
        dist.barrier()
    return folder


def _checkpoint_dtype(handle: ModelHandle) -> torch.dtype | None:
    """The dtype the source config.json declares (None if it declares none): the saved folder keeps it, so its
    config stays true and its size stays that of the source, whatever precision the model was trained in."""
    dtype = getattr(handle.hf_pretrained.config, "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class _ShardWriter:
    """Writes tensors to safetensors shards of at most `max_bytes`, with an index when there is more than one."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shard_names: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, self.folder / f"shard-{len(self.shard_names)}.partial", metadata={"format": "pt"})
        self.shard_names.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        count = len(self.shard_names)
        if count == 1:
            (self.folder / "shard-0.partial").rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for index, names in enumerate(self.shard_names):
            filename = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            (self.folder / f"shard-{index}.partial").rename(self.folder / filename)
            weight_map.update(dict.fromkeys(names, filename))
        index_file = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
