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
of the new weights. A server that stops answering during a tensor or disk sync (connection refused or reset, 5xx) is
left out of the rest of it and returned by `push` as lost, so the reachable servers still get the new weights; the
engine takes the lost ones out of rotation. A refusal (4xx) still fails the sync: it would fail everywhere. The
distributed transport cannot lose a member in the middle of a broadcast; its group is rebuilt when the set of
servers changes between syncs.
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
from prism_mcore.rollout.endpoint import ServerUnavailable, SGLangEndpoint
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


def _post_all(
    endpoints: Sequence[SGLangEndpoint], path: str, payloads: Sequence[dict[str, Any]]
) -> list[SGLangEndpoint]:
    """POST `payloads[i]` to `endpoints[i]` concurrently; returns the endpoints that gave no usable answer
    (`ServerUnavailable`) and raises `WeightSyncError` naming every server that refused."""
    with ThreadPoolExecutor(max_workers=len(endpoints)) as pool:
        results = [
            pool.submit(_post_checked, endpoint, path, payload)
            for endpoint, payload in zip(endpoints, payloads, strict=True)
        ]
        failures = [(endpoint, result.exception()) for endpoint, result in zip(endpoints, results, strict=True)]
    errors = [str(error) for _, error in failures if error is not None and not isinstance(error, ServerUnavailable)]
    if errors:
        raise WeightSyncError(f"{path} failed: " + "; ".join(errors))
    return [endpoint for endpoint, error in failures if isinstance(error, ServerUnavailable)]


def _post_all_or_raise(endpoints: Sequence[SGLangEndpoint], path: str, payloads: Sequence[dict[str, Any]]) -> None:
    """`_post_all` for steps every server must take (a process group's members): an unreachable one fails it."""
    lost = _post_all(endpoints, path, payloads)
    if lost:
        raise WeightSyncError(f"{path} failed: no answer from " + ", ".join(endpoint.url for endpoint in lost))


def _post_checked(endpoint: SGLangEndpoint, path: str, payload: dict[str, Any]) -> None:
    """POST and check SGLang's `{success, message}` answer of admin endpoints; `ServerUnavailable` passes through,
    any other failure is a `WeightSyncError`."""
    try:
        answer = endpoint.call("POST", path, payload)
    except ServerUnavailable:
        raise
    except RolloutError as error:
        raise WeightSyncError(str(error)) from None
    if isinstance(answer, dict) and answer.get("success") is False:
        raise WeightSyncError(f"{endpoint.url}{path}: {answer.get('message', 'no message')}")


class WeightSync(ABC):
    """Moves one version of the policy's weights into SGLang servers."""

    @abstractmethod
    def push(
        self, endpoints: Sequence[SGLangEndpoint], named_tensors: NamedTensors, version: str
    ) -> list[SGLangEndpoint]:
        """Load `named_tensors` into every server and label them `version`; returns the servers lost on the way
        (no answer; they may hold part of the weights) and raises `WeightSyncError` when a server refuses or none
        is left."""

    @abstractmethod
    def close(self, endpoints: Sequence[SGLangEndpoint]) -> None:
        """Release what the strategy set up on the servers (process groups)."""


class _UpdateSession:
    """`/begin_weight_update` on every server, and `/end_weight_update` on each that began, even after a failure
    (a server left inside a session refuses the next one). `live` are the servers still taking part: one that
    stops answering is dropped (`drop`) and not asked again."""

    def __init__(self, endpoints: Sequence[SGLangEndpoint]) -> None:
        self.endpoints = endpoints
        self.live: list[SGLangEndpoint] = []
        self.lost: list[SGLangEndpoint] = []

    def __enter__(self) -> _UpdateSession:
        try:
            for endpoint in self.endpoints:
                try:
                    _post_checked(endpoint, "/begin_weight_update", {})
                except ServerUnavailable:
                    self.lost.append(endpoint)
                    continue
                self.live.append(endpoint)
        except BaseException:
            self._end()
            raise
        self._check_someone_left()
        return self

    def drop(self, lost: Sequence[SGLangEndpoint]) -> None:
        self.lost += lost
        self.live = [endpoint for endpoint in self.live if endpoint not in lost]
        if lost:
            self._check_someone_left()

    def _check_someone_left(self) -> None:
        if not self.live and self.lost:
            raise WeightSyncError("no server answered during the weight sync: " + ", ".join(e.url for e in self.lost))

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        errors = self._end()
        # A failure to close must not hide the failure that is already propagating.
        if errors and exc_type is None:
            raise WeightSyncError("/end_weight_update failed: " + "; ".join(errors))

    def _end(self) -> list[str]:
        errors = []
        for endpoint in self.live:
            try:
                _post_checked(endpoint, "/end_weight_update", {})
            except ServerUnavailable:
                self.lost.append(endpoint)  # gone now: out of rotation like the others lost
            except RolloutError as error:
                errors.append(str(error))
        self.live = []
        return errors


@dataclass
class TensorWeightSync(WeightSync):
    """Colocated sync through `/update_weights_from_tensor` (see the module docstring)."""

    bucket_bytes: int = DEFAULT_BUCKET_BYTES

    def push(
        self, endpoints: Sequence[SGLangEndpoint], named_tensors: NamedTensors, version: str
    ) -> list[SGLangEndpoint]:
        tp_sizes = {endpoint.url: endpoint.tp_size() for endpoint in endpoints}
        with _UpdateSession(endpoints) as session:
            for bucket, last in buckets(named_tensors, self.bucket_bytes):
                live = list(session.live)
                payloads = [self.payload(bucket, tp_sizes[e.url], version if last else None) for e in live]
                session.drop(_post_all(live, "/update_weights_from_tensor", payloads))
        return session.lost

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
    _members: list[str] = field(default_factory=list, init=False, repr=False)  # server URLs in the group

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
                _post_all_or_raise, endpoints, "/init_weights_update_group", self.init_payloads(tp_sizes)
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

    def push(
        self, endpoints: Sequence[SGLangEndpoint], named_tensors: NamedTensors, version: str
    ) -> list[SGLangEndpoint]:
        """As `WeightSync.push`, except that a server lost during the broadcasts fails the sync (a collective
        cannot continue without a member); a server set that changed since the last sync gets a new group."""
        if self._group is not None and self._members != [endpoint.url for endpoint in endpoints]:
            self._disband(endpoints)
        if self._group is None:
            self._group = self._connect(endpoints)
            self._members = [endpoint.url for endpoint in endpoints]
        with _UpdateSession(endpoints), ThreadPoolExecutor(max_workers=1) as pool:
            for bucket, last in buckets(named_tensors, self.bucket_bytes):
                payload = self.update_payload(bucket, version if last else None)
                # The servers post their receives when the request arrives; the broadcasts match them in order.
                announced = pool.submit(
                    _post_all_or_raise, endpoints, "/update_weights_from_distributed", [payload] * len(endpoints)
                )
                for _, tensor in bucket:
                    dist.broadcast(tensor.contiguous(), group=self._group, group_src=0)
                announced.result()
        return []

    def _disband(self, endpoints: Sequence[SGLangEndpoint]) -> None:
        """Destroy the group on the members still here (a lost one no longer holds it) and on this side."""
        staying = [endpoint for endpoint in endpoints if endpoint.url in self._members]
        if staying:
            _post_all(staying, "/destroy_weights_update_group", [{"group_name": self.group_name}] * len(staying))
        dist.destroy_process_group(self._group)
        self._group = None
        self._members = []

    def close(self, endpoints: Sequence[SGLangEndpoint]) -> None:
        if self._group is None:
            return
        self._disband([endpoint for endpoint in endpoints if endpoint.url in self._members])


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

    def push(
        self, endpoints: Sequence[SGLangEndpoint], named_tensors: NamedTensors, version: str
    ) -> list[SGLangEndpoint]:
        target = write_hf_checkpoint(named_tensors, Path(self.directory) / f"weights_v{version}", self.base_checkpoint)
        payload = {"model_path": str(target.resolve()), "weight_version": version, "flush_cache": False}
        lost = _post_all(endpoints, "/update_weights_from_disk", [payload] * len(endpoints))
        if len(lost) == len(endpoints):
            raise WeightSyncError("no server answered during the weight sync: " + ", ".join(e.url for e in lost))
        if self._current is not None and self._current != target:
            shutil.rmtree(self._current, ignore_errors=True)
        self._current = target
        return lost

    def close(self, endpoints: Sequence[SGLangEndpoint]) -> None:
        """Nothing to release: the servers keep serving from the last folder, which stays on disk."""
