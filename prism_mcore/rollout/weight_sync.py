"""Weight sync from the trainer to SGLang servers: one strategy class per transport behind one interface.

Every strategy takes the policy's weights as the streaming HF export yields them, `(hf_name, tensor)` pairs consumed
once, and a version label, and leaves every server serving those weights under that label. The engine calls
`/flush_cache` afterwards, so the strategies post their updates with `flush_cache: false`.

- `TensorWeightSync` (colocated: trainer and servers share the GPUs of a host): `/update_weights_from_tensor` with
  the tensors pickled per server TP rank (CUDA IPC handles; CPU tensors travel by value), in buckets of
  `bucket_bytes`, between `/begin_weight_update` and `/end_weight_update` as SGLang 0.5.23 requires.
- `DistributedWeightSync` (servers on other nodes): a process group joining the trainer (rank 0) and every server
  TP rank (`/init_weights_update_group`), then per bucket `/update_weights_from_distributed` with names, dtypes and
  shapes while the trainer broadcasts the tensors, also between begin/end. NCCL in production; the project's CPU
  server joins gloo groups, which is how the protocol is tested without GPUs.
- `DiskWeightSync` (any topology with a shared filesystem): the trainer writes an HF checkpoint folder
  (`hf_checkpoint.write_hf_checkpoint`, as the HF export does) and the servers load it with
  `/update_weights_from_disk`.

The version label rides on the last request of a sync, so a server reports the new version only once it holds all
of the new weights.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from prism_mcore.hf_checkpoint import NamedTensors, tensor_buckets, write_hf_checkpoint
from prism_mcore.rollout.base import RolloutError
from prism_mcore.rollout.endpoint import SGLangEndpoint
from prism_mcore.rollout.protocol import serialize_named_tensors

Bucket = list[tuple[str, torch.Tensor]]

DEFAULT_BUCKET_BYTES = 512 * 1024**2


class WeightSyncError(RolloutError):
    """A server did not take the new weights."""


def buckets(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[tuple[Bucket, bool]]:
    """Group the stream into lists of at most `bucket_bytes` (a larger tensor gets a bucket of its own), each with a
    flag telling whether it is the last; raises `WeightSyncError` on an empty stream."""
    pending: Bucket | None = None
    for bucket in tensor_buckets(named_tensors, bucket_bytes):
        if pending is not None:
            yield pending, False
        pending = bucket
    if pending is None:
        raise WeightSyncError("the weight stream yielded no tensors")
    yield pending, True


def _post_all(endpoints: Sequence[SGLangEndpoint], path: str, payloads: Sequence[dict[str, Any]]) -> None:
    """POST `payloads[i]` to `endpoints[i]` concurrently; raise `WeightSyncError` naming every server that failed."""
    with ThreadPoolExecutor(max_workers=len(endpoints)) as pool:
        results = [
            pool.submit(_post_checked, endpoint, path, payload)
            for endpoint, payload in zip(endpoints, payloads, strict=True)
        ]
        errors = [str(result.exception()) for result in results if result.exception() is not None]
    if errors:
        raise WeightSyncError(f"{path} failed: " + "; ".join(errors))


def _post_checked(endpoint: SGLangEndpoint, path: str, payload: dict[str, Any]) -> None:
    """POST and check SGLang's `{success, message}` answer of admin endpoints; any failure is a `WeightSyncError`."""
    try:
        answer = endpoint.call("POST", path, payload)
    except RolloutError as error:
        raise WeightSyncError(str(error)) from None
    if isinstance(answer, dict) and answer.get("success") is False:
        raise WeightSyncError(f"{endpoint.url}{path}: {answer.get('message', 'no message')}")


class WeightSync(ABC):
    """Moves one version of the policy's weights into SGLang servers."""

    @abstractmethod
    def push(self, endpoints: Sequence[SGLangEndpoint], named_tensors: NamedTensors, version: str) -> None:
        """Load `named_tensors` into every server and label them `version`; raises `WeightSyncError`."""

    @abstractmethod
    def close(self, endpoints: Sequence[SGLangEndpoint]) -> None:
        """Release what the strategy set up on the servers (process groups)."""


class _UpdateSession:
    """`/begin_weight_update` on every server, and `/end_weight_update` on each that began, even after a failure
    (a server left inside a session refuses the next one)."""

    def __init__(self, endpoints: Sequence[SGLangEndpoint]) -> None:
        self.endpoints = endpoints
        self.open: list[SGLangEndpoint] = []

    def __enter__(self) -> _UpdateSession:
        try:
            for endpoint in self.endpoints:
                _post_checked(endpoint, "/begin_weight_update", {})
                self.open.append(endpoint)
        except BaseException:
            self._end()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        errors = self._end()
        # A failure to close must not hide the failure that is already propagating.
        if errors and exc_type is None:
            raise WeightSyncError("/end_weight_update failed: " + "; ".join(errors))

    def _end(self) -> list[str]:
        errors = []
        for endpoint in self.open:
            try:
                _post_checked(endpoint, "/end_weight_update", {})
            except RolloutError as error:
                errors.append(str(error))
        self.open = []
        return errors


@dataclass
class TensorWeightSync(WeightSync):
    """Colocated sync through `/update_weights_from_tensor` (see the module docstring)."""

    bucket_bytes: int = DEFAULT_BUCKET_BYTES

    def push(self, endpoints: Sequence[SGLangEndpoint], named_tensors: NamedTensors, version: str) -> None:
        tp_sizes = [endpoint.tp_size() for endpoint in endpoints]
        with _UpdateSession(endpoints):
            for bucket, last in buckets(named_tensors, self.bucket_bytes):
                payloads = [self.payload(bucket, tp_size, version if last else None) for tp_size in tp_sizes]
                _post_all(endpoints, "/update_weights_from_tensor", payloads)

    def close(self, endpoints: Sequence[SGLangEndpoint]) -> None:
        """Nothing to release: each update is self-contained."""

    @staticmethod
    def payload(bucket: Bucket, tp_size: int, version: str | None) -> dict[str, Any]:
        # One serialisation per TP rank: each rank opens (and reference-counts) its own copy of the IPC handles.
        payload: dict[str, Any] = {
            "serialized_named_tensors": [serialize_named_tensors(bucket) for _ in range(tp_size)],
            "flush_cache": False,
        }
        if version is not None:
            payload["weight_version"] = version
        return payload


def init_weight_update_group(
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    backend: str,
    timeout_s: float,
) -> dist.ProcessGroup:
    """One member's end of the group SGLang's `/init_weights_update_group` creates: the trainer joins as rank 0,
    server TP ranks as `rank_offset + tp_rank` (the project's server uses this for its side too).

    Every member must rendezvous exactly as SGLang's `init_custom_process_group` does (a TCP store served by rank 0
    at the master address, keys prefixed by the group name). torch has no public way to build a group that is
    independent of the default one, so this uses the same torch internals SGLang uses; group rank r is global rank
    r within the group.
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank=rank, world_size=world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=group_name,
        timeout=timeout,
    )
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


@dataclass
class DistributedWeightSync(WeightSync):
    """Sync through a trainer->servers process group (NCCL on GPUs); see the module docstring.

    `master_address`/`master_port` must be reachable from every server; server i's ranks start at
    `1 + sum(tp sizes of servers before i)`. The tensors are broadcast from the device they are on, which must suit
    the backend (CUDA for NCCL).
    """

    master_address: str
    master_port: int
    group_name: str = "prism_weight_update"
    backend: str = "nccl"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 600.0
    _group: dist.ProcessGroup | None = field(default=None, init=False, repr=False)

    def init_payloads(self, tp_sizes: Sequence[int]) -> list[dict[str, Any]]:
        """The `/init_weights_update_group` bodies, one per server."""
        world_size = 1 + sum(tp_sizes)
        offsets = [1 + sum(tp_sizes[:index]) for index in range(len(tp_sizes))]
        return [
            {
                "master_address": self.master_address,
                "master_port": self.master_port,
                "rank_offset": offset,
                "world_size": world_size,
                "group_name": self.group_name,
                "backend": self.backend,
            }
            for offset in offsets
        ]

    def update_payload(self, bucket: Bucket, version: str | None) -> dict[str, Any]:
        """The `/update_weights_from_distributed` body announcing the tensors of one broadcast bucket."""
        payload: dict[str, Any] = {
            "names": [name for name, _ in bucket],
            "dtypes": [str(tensor.dtype).removeprefix("torch.") for _, tensor in bucket],
            "shapes": [list(tensor.shape) for _, tensor in bucket],
            "group_name": self.group_name,
            "flush_cache": False,
        }
        if version is not None:
            payload["weight_version"] = version
        return payload

    def _connect(self, endpoints: Sequence[SGLangEndpoint]) -> dist.ProcessGroup:
        """Create the group: the servers join in `/init_weights_update_group` while the trainer joins here."""
        tp_sizes = [endpoint.tp_size() for endpoint in endpoints]
        with ThreadPoolExecutor(max_workers=1) as pool:
            servers_joined = pool.submit(
                _post_all, endpoints, "/init_weights_update_group", self.init_payloads(tp_sizes)
            )
            group = init_weight_update_group(
                self.master_address,
                self.master_port,
                1 + sum(tp_sizes),
                0,
                self.group_name,
                self.backend,
                self.timeout_s,
            )
            servers_joined.result()
        return group

    def push(self, endpoints: Sequence[SGLangEndpoint], named_tensors: NamedTensors, version: str) -> None:
        if self._group is None:
            self._group = self._connect(endpoints)
        with _UpdateSession(endpoints), ThreadPoolExecutor(max_workers=1) as pool:
            for bucket, last in buckets(named_tensors, self.bucket_bytes):
                payload = self.update_payload(bucket, version if last else None)
                # The servers post their receives when the request arrives; the broadcasts match them in order.
                announced = pool.submit(
                    _post_all, endpoints, "/update_weights_from_distributed", [payload] * len(endpoints)
                )
                for _, tensor in bucket:
                    dist.broadcast(tensor.contiguous(), group=self._group, group_src=0)
                announced.result()

    def close(self, endpoints: Sequence[SGLangEndpoint]) -> None:
        if self._group is None:
            return
        _post_all(endpoints, "/destroy_weights_update_group", [{"group_name": self.group_name}] * len(endpoints))
        dist.destroy_process_group(self._group)
        self._group = None


@dataclass
class DiskWeightSync(WeightSync):
    """Sync through a checkpoint folder the servers can read (`/update_weights_from_disk`).

    Version v is written to `<directory>/weights_v<v>`: safetensors shards next to copies of the non-weight files of
    `base_checkpoint` (config, tokenizer, processor), so the folder is a complete HF checkpoint; it is written under
    a temporary name and renamed, so no server ever sees half of it. The previous version's folder is removed once
    every server has loaded the new one.
    """

    directory: Path
    base_checkpoint: Path
    _current: Path | None = field(default=None, init=False, repr=False)

    def push(self, endpoints: Sequence[SGLangEndpoint], named_tensors: NamedTensors, version: str) -> None:
        target = write_hf_checkpoint(named_tensors, Path(self.directory) / f"weights_v{version}", self.base_checkpoint)
        payload = {"model_path": str(target.resolve()), "weight_version": version, "flush_cache": False}
        _post_all(endpoints, "/update_weights_from_disk", [payload] * len(endpoints))
        if self._current is not None and self._current != target:
            shutil.rmtree(self._current, ignore_errors=True)
        self._current = target

    def close(self, endpoints: Sequence[SGLangEndpoint]) -> None:
        """Nothing to release: the servers keep serving from the last folder, which stays on disk."""
