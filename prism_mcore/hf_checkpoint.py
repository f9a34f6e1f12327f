"""HF checkpoint folders written from a stream of `(hf_name, tensor)` pairs, holding one shard in memory at a time,
and read back as such a stream (`read_hf_weights`).

Both writers of the trainer's weights use it: `models.export.save_hf` (the exported policy or discriminator) and the
disk weight sync of `rollout.weight_sync` (a folder SGLang servers load). It imports only torch and safetensors, so
`rollout/` can use it without importing Megatron (which every module under `models/` may do).

A folder holds the tensors in safetensors shards of at most `max_shard_bytes` (a larger tensor gets a shard of its
own): `model.safetensors` alone, or `model-0000k-of-0000N.safetensors`, with the weight-map index
`model.safetensors.index.json` either way, and every other file of the source checkpoint (config, tokenizer,
processor, chat template, generation config) copied, so the folder is a complete checkpoint. It is written to
`<folder>.tmp` and renamed when complete, replacing an older folder of that name: a reader never sees half of it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

NamedTensors = Iterable[tuple[str, torch.Tensor]]

# Files of an HF checkpoint folder that hold weights; everything else is copied.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def tensor_buckets(named_tensors: NamedTensors, max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group the stream, in order, into lists of at most `max_bytes` (a larger tensor gets a list of its own)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def write_hf_checkpoint(
    named_tensors: NamedTensors,
    folder: str | Path,
    config_source_dir: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the stream as the HF checkpoint folder `folder`, with the non-weight files of `config_source_dir`.

    Returns the folder; raises `ValueError` on an empty stream.
    """
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for item in sorted(Path(config_source_dir).iterdir()):
        if item.is_file() and not item.name.endswith(WEIGHT_FILE_SUFFIXES) and item.name not in WEIGHT_INDEX_FILES:
            shutil.copy2(item, staging / item.name)

    shard_names: list[list[str]] = []
    total_bytes = 0
    for bucket in tensor_buckets(named_tensors, max_shard_bytes):
        shard = {name: tensor.detach().cpu().contiguous() for name, tensor in bucket}
        save_file(shard, staging / f"shard-{len(shard_names)}.partial", metadata={"format": "pt"})
        shard_names.append(list(shard))
        total_bytes += sum(tensor.numel() * tensor.element_size() for tensor in shard.values())
    if not shard_names:
        shutil.rmtree(staging)
        raise ValueError("the weight stream yielded no tensors")

    # The file names need the shard count, known only now.
    count = len(shard_names)
    weight_map = {}
    for index, names in enumerate(shard_names):
        filename = "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        (staging / f"shard-{index}.partial").rename(staging / filename)
        weight_map.update(dict.fromkeys(names, filename))
    index_file = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (staging / WEIGHT_INDEX_FILES[0]).write_text(json.dumps(index_file, indent=2))

    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder: those its index names, else every `*.safetensors`."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / name for name in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    return files


def read_hf_weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every `(hf_name, tensor)` of a checkpoint folder, one tensor at a time (the files are checked first)."""
    files = safetensors_files(folder)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            with safe_open(str(file), framework="pt") as weights:
                for name in weights.keys():
                    yield name, weights.get_tensor(name)

    return stream()
