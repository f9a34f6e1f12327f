"""A stage's rollout engine lives exactly as long as the stage (`stages.rollouts.rollout_engine`): against the
project's SGLang-protocol server, with the `distributed` weight sync (a process group per engine, over gloo on CPU),
a stage that fails mid-way and one that ends normally leave no request thread, no connection and no process group
behind, and the next stage opens its own group on the same port."""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from torch.distributed import distributed_c10d

from prism_mcore.config.schema import RolloutConfig
from prism_mcore.data.embedded import EmbeddedAssets
from prism_mcore.record import Sample
from prism_mcore.rollout import SamplingParams
from prism_mcore.stages.rollouts import rollout_engine
from tests.rollout_support import running_server
from tests.torchrun import free_port

PARAMS = SamplingParams(n=1, temperature=0.0, max_new_tokens=4, seed=0)
GROUP = "prism_weight_update"  # DistributedWeightSync's group name


def _stage_context(server_url: str, port: int, run_dir: Path) -> SimpleNamespace:
    """What `rollout_engine` reads of a run context, for the rank that generates."""
    config = RolloutConfig(
        engine="sglang",
        server_urls=[server_url],
        request_timeout_s=60.0,
        server_ready_timeout_s=60.0,
        weight_sync="distributed",
        weight_sync_master_address="127.0.0.1",
        weight_sync_master_port=port,
    )
    return SimpleNamespace(
        is_main=True,
        env=SimpleNamespace(device=torch.device("cpu")),
        config=SimpleNamespace(rollout=config),
        run_dir=run_dir,
        released_engines=weakref.WeakSet(),
    )


def _groups() -> set[str]:
    return set(distributed_c10d._world.pg_names.values())


def _connections(ports: set[int]) -> list:
    """This process's TCP sockets to or on `ports` (the server's, the weight-sync store's)."""
    return [
        c
        for c in psutil.Process().net_connections(kind="tcp")
        if (c.raddr and c.raddr.port in ports) or (c.laddr and c.laddr.port in ports)
    ]


def _extra_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since `before` that are still running a moment later (an executor's workers exit once they
    see its shutdown)."""
    deadline = time.monotonic() + 10
    while (extra := [t for t in threading.enumerate() if t not in before]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return extra


def test_each_stage_closes_its_engine_and_weight_sync_group_however_it_ends(
    embedded: EmbeddedAssets, prompts: list[Sample], tmp_path: Path
) -> None:
    with running_server(embedded.policy_path, tmp_path / "server.log") as server:
        port = free_port()
        ports = {int(server.url.rsplit(":", 1)[1]), port}
        ctx = _stage_context(server.url, port, tmp_path)
        threads_before, groups_before = set(threading.enumerate()), _groups()
        assert GROUP not in groups_before and not _connections(ports)

        # A stage that fails after its engine joined the servers in a weight-sync group (pushing its checkpoint).
        with (
            pytest.raises(RuntimeError, match="stage failed"),
            rollout_engine(ctx, str(embedded.policy_path)) as engine,
        ):
            assert GROUP in _groups() and _connections(ports)  # the group and the client's connections are open
            first = engine.generate(prompts[:1], PARAMS)
            assert _extra_threads(threads_before)  # the request threads are running
            raise RuntimeError("stage failed")
        assert _extra_threads(threads_before) == []
        assert _groups() == groups_before and _connections(ports) == []

        # The next stage: a new group under the same name on the same port (the server's side was destroyed too,
        # or it would refuse to create the group again), sampling as the first did, then closed at its end.
        with rollout_engine(ctx, str(embedded.policy_path), weight_version=1) as engine:
            second = engine.generate(prompts[:1], PARAMS)
        assert _extra_threads(threads_before) == []
        assert _groups() == groups_before and _connections(ports) == []
    assert [s.response_ids for s in second] == [s.response_ids for s in first]
    assert [s.weight_version for s in first + second] == [0, 1]
