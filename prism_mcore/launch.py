"""`python -m prism_mcore.launch [LAUNCH OPTIONS] COMMAND [--recipe R] [k=v ...]`: torchrun for prism_mcore, with
what torchrun cannot know checked first and the failing rank's one-line error shown once.

Launch options (torchrun's): `--nnodes`, `--node-rank`, `--nproc-per-node`, `--master-addr`, `--master-port`.
Before any worker starts: the config is checked as the workers will check it (one line, exit code 2), and on node 0
the run folder's lock is tested, so a second copy of a running command stops with the lock's one line (exit code 3)
instead of torchrun's EADDRINUSE on the first one's port. Without `--master-port`, a one-node job takes a free port
(several nodes must agree on one: they keep 29500). A worker stopped by an error the user must fix (exit code 2 or 3)
has written its line to torchrun's error file: the launcher prints that line alone instead of torchrun's report;
any other failure is reported by torchrun as usual. `recipes`, `config`, `report` and `compare` run directly.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from prism_mcore.cli import LAUNCHED_ENV, RUN_FOLDER_IN_USE, USER_ERROR, prepare, user_error
from prism_mcore.cli import main as cli_main
from prism_mcore.config import STAGES, ConfigError
from prism_mcore.data.errors import DataError
from prism_mcore.training.run_lock import RunFolderInUse, check_run_dir_free

DEFAULT_MASTER_PORT = 29500


def free_port(address: str) -> int:
    """A TCP port nobody listens on at `address` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prism_mcore.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=None, help="default: a free port on one node, else 29500")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the prism_mcore command line")
    return parser


def torchrun_args(args: argparse.Namespace, command: list[str]) -> list[str]:
    port = args.master_port
    if port is None:
        port = free_port(args.master_addr) if args.nnodes == 1 else DEFAULT_MASTER_PORT
    return [
        "--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank),
        "--nproc-per-node", str(args.nproc_per_node),
        "--master-addr", args.master_addr, "--master-port", str(port),
        "-m", "prism_mcore", *command,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command
    if not command or command[0] not in ("run", *STAGES):
        return cli_main(command)
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--recipe", default="embedded")
    options, overrides = recipe_parser.parse_known_args(command[1:])
    try:
        config, _ = prepare(command[0], options.recipe, overrides, world_size=args.nnodes * args.nproc_per_node)
        if args.node_rank == 0:  # global rank 0, which takes the lock, runs on node 0
            check_run_dir_free(config.run.output_dir)
    except (ConfigError, DataError) as error:
        return user_error(error, USER_ERROR)
    except RunFolderInUse as error:
        return user_error(error, RUN_FOLDER_IN_USE)

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ[LAUNCHED_ENV] = "1"
    # The agent logs each failed worker; the failure itself is reported below (one line) or by ChildFailedError.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        # `run`, not `main`: main's error recorder would log the worker's error file again before we print it.
        torchrun.run(torchrun.parse_args(torchrun_args(args, command)))
    except ChildFailedError as failed:
        _, failure = failed.get_first_failure()
        if failure.exitcode in (USER_ERROR, RUN_FOLDER_IN_USE) and isinstance(failure.message, str) and failure.message:
            print(failure.message, file=sys.stderr, flush=True)
            return failure.exitcode
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
