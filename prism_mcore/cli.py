"""Command line: `python -m prism_mcore COMMAND [--recipe NAME|FILE] [section.field=value ...]`.

Commands: `run` executes the stages listed in `run.stages` in order (the whole PRISM pipeline by default) and ends
with the table of accuracy per stage and the training-curve plot; `sft`, `warmup`, `align`, `rlvr` run one stage;
`config` prints the resolved config; `recipes` lists the named recipes and the released recipe files;
`report DIR` prints a run's table again (finished or not); `compare BASELINE_DIR PRISM_DIR` sets two runs' final
accuracies side by side.

Before any stage starts, the config is checked (every value in range, token budgets that hold a sample, settings
this machine can run, every configured model and data path present) and the resolved config (embedded-default
paths filled in) is saved as `<run.output_dir>/config.json`. Every problem the user must fix (a `ConfigError`, a
`DataError` found while reading data, a `StageFailed`) ends the command with one line `error: ...` and exit code 2;
a run folder in use by another job, exit code 3. `config` prints a config without the machine check. Under
`torchrun` every rank runs the same command, and a rank stopped by such an error also writes its line to torchrun's
error file, from which `python -m prism_mcore.launch` (what examples/run_prism.sh runs) prints it once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prism_mcore.config import RECIPES, STAGES, Config, ConfigError, apply_overrides, load_recipe, to_dict
from prism_mcore.config.recipes import RECIPE_DIR, released_recipe_files
from prism_mcore.config.schema import check_ranges, check_token_budgets
from prism_mcore.data.errors import DataError
from prism_mcore.training.errors import StageFailed
from prism_mcore.training.metrics import global_rank
from prism_mcore.training.run_lock import RunFolderInUse

USER_ERROR, RUN_FOLDER_IN_USE = 2, 3  # exit codes
LAUNCHED_ENV = "PRISM_LAUNCHER"  # set by prism_mcore.launch: it prints the failing rank's line itself

STAGE_HELP = {
    "sft": "Stage 1: supervised fine-tuning of the policy on multimodal demonstrations",
    "warmup": "discriminator warmup: pairwise Bradley-Terry on caption and CoT pairs",
    "align": "Stage 2: PRISM alignment against the MoE discriminator",
    "rlvr": "Stage 3: RLVR (GRPO, DAPO or GSPO) with the verifiable reward",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m prism_mcore",
        description="PRISM (SFT -> adversarial distribution alignment -> RLVR) for Qwen3-VL on Megatron-Core.",
        epilog="Overrides are dotted keys, e.g. align.policy_optim.lr=1e-6 parallel.tensor=2 rollout.n=8.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> None:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--recipe", default="embedded", help=f"one of {', '.join(RECIPES)}, or a .py/.json file")
        sub.add_argument("overrides", nargs="*", metavar="section.field=value")

    add("run", "run the stages of run.stages in order (default: sft warmup align rlvr)")
    for stage in STAGES:
        add(stage, STAGE_HELP[stage])
    add("config", "print the resolved config as JSON")
    commands.add_parser("recipes", help=f"list the named recipes and the released recipe files ({RECIPE_DIR.name}/)")
    report = commands.add_parser("report", help="print a run's per-stage table and write its plot")
    report.add_argument("run_dir")
    compare = commands.add_parser("compare", help="final accuracies of an SFT->RLVR and an SFT->PRISM->RLVR run")
    compare.add_argument("baseline_dir")
    compare.add_argument("prism_dir")
    return parser


def resolve_config(recipe: str, overrides: list[str]) -> Config:
    """The recipe with the overrides applied, every value checked against its range."""
    config = apply_overrides(load_recipe(recipe), overrides)
    check_ranges(config)
    return config


def check_world_size(config: Config, world_size: int) -> None:
    """Refuse parallel sizes the torchrun world cannot be split into (before any process group is made)."""
    parallel = config.parallel
    model_parallel = parallel.tensor * parallel.pipeline * parallel.context
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel.tensor x pipeline x context = {model_parallel} does not divide the world size {world_size}"
        )
    if (world_size // model_parallel * parallel.context) % parallel.expert:
        raise ConfigError(
            f"parallel.expert={parallel.expert} does not divide data x context parallel "
            f"= {world_size // model_parallel * parallel.context}"
        )


def stage_inputs(config: Config, stages: list[str]) -> list[tuple[str, str]]:
    """(key, path) of every configured (non-empty) model and data path the `stages` read."""
    keys = ["model.policy_path"]  # the tokenizer and image processor come from the policy checkpoint
    for stage in stages:
        keys += {
            "sft": ["data.sft_path", "data.val_path", "data.test_path"],
            "warmup": ["model.discriminator_path", "data.warmup_path"]
            + (["data.align_path"] if config.warmup.self_play_pairs > 0 else []),
            "align": ["model.discriminator_path", "data.align_path", "data.val_path", "data.test_path"],
            "rlvr": ["data.rl_path", "data.val_path", "data.test_path"],
        }[stage]
    inputs = []
    for key in dict.fromkeys(keys):
        section, name = key.split(".")
        path = getattr(getattr(config, section), name)
        if path:
            inputs.append((key, path))
    return inputs


def check_paths(config: Config, stages: list[str]) -> None:
    """Refuse, before the first step, a configured model folder or data file that is missing or unreadable."""
    from prism_mcore.data.readers import check_data_file

    for key, path in stage_inputs(config, stages):
        if key.startswith("model."):
            if not Path(path).is_dir():
                raise ConfigError(f"{key}={path}: no such checkpoint folder")
        elif key == "data.sft_path" and config.data.sft_dataset:
            if not (Path(path) / "dataset_info.json").is_file():
                raise ConfigError(f"{key}={path}: no dataset_info.json in this folder (data.sft_dataset is set)")
        else:
            try:
                check_data_file(path)
            except DataError as error:
                raise ConfigError(f"{key}={path}: {error.message}") from None


def check_model_settings(config: Config) -> None:
    """Refuse, before any stage starts, a model backend or FP8 recipe this machine cannot build (e.g. no TE)."""
    from prism_mcore.models.backend import fp8_settings, resolve_backend

    try:
        fp8_settings(config.model.fp8, resolve_backend(config.model.attention_backend))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_schedules(config: Config) -> None:
    """Refuse an LR warmup as long as its stage (a stage of fixed length: alignment, RLVR), naming the key."""
    for key, optim, steps in (
        ("align.policy_optim", config.align.policy_optim, config.align.steps),
        ("align.discriminator_optim", config.align.discriminator_optim, config.align.steps),
        ("rlvr.optim", config.rlvr.optim, config.rlvr.steps),
    ):
        if optim.warmup_steps and optim.warmup_steps >= steps:
            step_key = key.split(".")[0] + ".steps"
            raise ConfigError(
                f"{key}.warmup_steps={optim.warmup_steps} must be below {step_key}={steps} "
                "(the schedule needs steps after its warmup)"
            )


def _stage_runner(stage: str) -> Callable[[Config], None]:
    """A stage's `run`, imported only once the config checks passed (the stages import Megatron)."""
    return importlib.import_module(f"prism_mcore.stages.{stage}").run


def prepare(command: str, recipe: str, overrides: list[str], world_size: int | None = None) -> tuple[Config, list[str]]:
    """The checked config of a run or stage command and the stages it runs; `ConfigError` for anything to fix.

    `world_size`: the number of ranks (default: torchrun's `WORLD_SIZE`, 1 without torchrun)."""
    config = resolve_config(recipe, overrides)
    stages = list(config.run.stages) if command == "run" else [command]
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ConfigError(f"run.stages: unknown stage(s) {unknown}; allowed: {', '.join(STAGES)}")
    check_token_budgets(config, stages)
    check_world_size(config, world_size or int(os.environ.get("WORLD_SIZE", 1)))
    check_model_settings(config)
    check_schedules(config)
    check_paths(config, stages)
    return config, stages


def user_error(error: Exception, code: int) -> int:
    """Report an error the user must act on in one line; returns the exit code.

    Under torchrun the line also goes to this rank's error file, where the launcher reads the failing rank's line.
    """
    line = f"error: {error}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    if not (error_file and os.environ.get(LAUNCHED_ENV)):
        print(line, file=sys.stderr, flush=True)
    return code


def list_recipes() -> str:
    """The named recipes, then the released recipe files (by the name examples/run_prism.sh takes)."""
    lines = [f"{name:20s} {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in RECIPES.items()]
    for path in released_recipe_files():
        lines.append(
            f"{path.stem:20s} {path.relative_to(RECIPE_DIR.parents[1])} (bash examples/run_prism.sh {path.stem})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "recipes":
        print(list_recipes())
        return 0
    if args.command in ("report", "compare"):
        from prism_mcore import report

        try:
            text = report.finalize(args.run_dir) if args.command == "report" else report.comparison(
                args.baseline_dir, args.prism_dir)  # fmt: skip
        except FileNotFoundError as err:
            return user_error(err, USER_ERROR)
        print(text)
        return 0
    try:
        if args.command == "config":
            config = resolve_config(args.recipe, args.overrides)
            check_token_budgets(config, config.run.stages)
            print(json.dumps(to_dict(config), indent=2))
            return 0
        config, stages = prepare(args.command, args.recipe, args.overrides)
        runners = [_stage_runner(stage) for stage in stages]
        for runner in runners:
            runner(config)
    except (ConfigError, DataError, StageFailed) as err:
        return user_error(err, USER_ERROR)
    except RunFolderInUse as err:
        return user_error(err, RUN_FOLDER_IN_USE)
    if args.command == "run" and global_rank() == 0:
        from prism_mcore import report

        print("\n" + report.finalize(config.run.output_dir), flush=True)
    from prism_mcore.runtime import shutdown

    shutdown()
    return 0
