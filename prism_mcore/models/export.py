"""HF export: a stream of `(hf_name, tensor)` pairs, and HF checkpoint folders written from it.

`iter_hf_weights` is what rollout engines consume after every policy update (the LocalEngine loads the pairs into
its transformers model; the SGLang client sends them to the servers' weight-update endpoints). Megatron-Bridge
gathers each tensor from its tensor-parallel shards and broadcasts it from the pipeline stage (and expert-parallel
rank) that holds it, so every rank sees every full tensor, one at a time: peak extra memory is one tensor, not the
model. The names and layouts are those of the source checkpoint (fused experts stay fused), and an import/export
round trip reproduces the source tensors bit for bit (tests/unit/models/test_export.py). For the discriminator the
stream carries the backbone and `v_head.1.weight` (`models/discriminator.py`).

`save_hf` writes a self-contained HF folder from it (`hf_checkpoint.write_hf_checkpoint`): the exported tensors
(safetensors shards), and the config, tokenizer, processor, chat template and generation config copied from the
source folder; transformers loads it with the same logits as the Megatron model. It is written to `<folder>.tmp` and
renamed when complete.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from prism_mcore.hf_checkpoint import DEFAULT_MAX_SHARD_BYTES, write_hf_checkpoint
from prism_mcore.models.build import ModelHandle


def iter_hf_weights(handle: ModelHandle, *, cpu: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream every weight of the model as `(hf_name, full tensor)`, on every rank (a collective: all ranks of the
    model-parallel group must consume the whole stream). `cpu=False` keeps tensors on the GPU, for NCCL broadcast
    or CUDA-IPC weight updates."""
    stream = handle.bridge.stream_weights_megatron_to_hf(
        handle.chunks, handle.hf_pretrained, cpu=cpu, show_progress=False
    )
    yield from stream  # HFWeightTuple: a (name, tensor) named tuple


def save_hf(handle: ModelHandle, folder: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the model as an HF checkpoint folder (collective; rank 0 writes). Returns the folder."""
    folder = Path(folder)
    if dist.is_initialized() and dist.get_rank() != 0:
        collections.deque(iter_hf_weights(handle), maxlen=0)  # the export is collective: every rank takes part
    else:
        dtype = _checkpoint_dtype(handle)
        tensors = (
            (name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
            for name, tensor in iter_hf_weights(handle)
        )
        write_hf_checkpoint(tensors, folder, handle.hf_path, max_shard_bytes=max_shard_bytes)
    if dist.is_initialized():
        dist.barrier()
    return folder


def _checkpoint_dtype(handle: ModelHandle) -> torch.dtype | None:
    """The dtype the source config.json declares (None if it declares none): the saved folder keeps it, so its
    config stays true and its size stays that of the source, whatever precision the model was trained in."""
    dtype = getattr(handle.hf_pretrained.config, "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
