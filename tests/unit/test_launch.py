"""The launcher (what examples/run_prism.sh runs): a run folder in use is refused before torchrun starts (no
EADDRINUSE from a second copy of a running command), a one-node job takes a free master port, and a worker's data
error reaches the user as its one line with exit code 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prism_mcore import launch
from prism_mcore.data.embedded.build import ensure_embedded
from tests.unit.test_run_lock import lock_holder

REPO = Path(__file__).parents[2]


def test_a_run_folder_in_use_is_refused_before_torchrun_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    holder = lock_holder(run_dir)
    from torch.distributed import run as torchrun

    monkeypatch.setattr(torchrun, "run", lambda args: pytest.fail("torchrun started"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert launch.main(["--nproc-per-node", "1", "run", f"run.output_dir={run_dir}"]) == 3
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert err == f"error: {run_dir} is in use by a running job (pid {holder.pid} on {socket.gethostname()}): stop " \
        "it, or choose another run.output_dir"  # fmt: skip


def test_a_config_error_is_one_line_before_torchrun_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torch.distributed import run as torchrun

    monkeypatch.setattr(torchrun, "run", lambda args: pytest.fail("torchrun started"))
    assert launch.main(["--nproc-per-node", "2", "sft", "parallel.tensor=4"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: parallel.tensor x pipeline x context = 4 does not divide the world size 2"
    )


def test_a_one_node_job_takes_a_free_master_port() -> None:
    parser = launch._parser()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        args = launch.torchrun_args(parser.parse_args(["run"]), ["run"])
        port = int(args[args.index("--master-port") + 1])
        assert port != taken
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))  # free now
    given = launch.torchrun_args(parser.parse_args(["--master-port", str(taken), "run"]), ["run"])
    assert given[given.index("--master-port") + 1] == str(taken)
    several = launch.torchrun_args(parser.parse_args(["--nnodes", "2", "run"]), ["run"])
    assert several[several.index("--master-port") + 1] == "29500"  # nodes must agree: torchrun's default
    assert several[-3:] == ["-m", "prism_mcore", "run"]


def test_a_workers_data_error_is_one_line_under_torchrun(tmp_path: Path) -> None:
    rows = pq.read_table(ensure_embedded().rl_path).slice(0, 4).to_pylist()
    for row in rows:
        row["data_source"] = "my_source"
    data = tmp_path / "rl.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "prism_mcore.launch", "--nproc-per-node", "1", "rlvr", f"data.rl_path={data}",
         f"run.output_dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {data}, row 0, field 'data_source': no reward judge for data_source 'my_source'; registered: "
        "hiyouga/geometry3k, math-77k, mm_gad, visual_logic-26k [invalid_value]"
    ]
    assert not (tmp_path / "run" / "stages" / "rlvr.done").exists()
