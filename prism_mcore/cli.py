"""Command line: `python -m prism_mcore COMMAND [--recipe NAME|FILE] [section.field=value ...]`.

Commands: `run` executes the stages listed in `run.stages` in order (the whole PRISM pipeline by default) and ends
with the table of accuracy per stage and the training-curve plot; `sft`, `warmup`, `align`, `rlvr` run one stage;
`config` prints the resolved config; `recipes` lists the named recipes; `report DIR` prints a run's table again;
`compare BASELINE_DIR PRISM_DIR` sets two runs' final accuracies side by side.
The resolved config (embedded-default paths filled in) is saved as `<run.output_dir>/config.json` before any
stage starts. Settings this machine cannot run (FP8 or `model.attention_backend=te` without Transformer Engine) are
refused with one line, exit code 2, before any stage starts; `config` prints them without that check. Under
`torchrun` every rank runs the same command.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys

from prism_mcore.config import RECIPES, STAGES, Config, ConfigError, apply_overrides, load_recipe, to_dict
from prism_mcore.training.metrics import global_rank
from prism_mcore.training.run_lock import RunFolderInUse

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
    commands.add_parser("recipes", help="list the named recipes")
    report = commands.add_parser("report", help="print a run's per-stage table and write its plot")
    report.add_argument("run_dir")
    compare = commands.add_parser("compare", help="final accuracies of an SFT->RLVR and an SFT->PRISM->RLVR run")
    compare.add_argument("baseline_dir")
    compare.add_argument("prism_dir")
    return parser


def resolve_config(recipe: str, overrides: list[str]) -> Config:
    return apply_overrides(load_recipe(recipe), overrides)


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


def _stage_runner(stage: str):
    module_name = f"prism_mcore.stages.{stage}"
    if importlib.util.find_spec("prism_mcore.stages") is None or importlib.util.find_spec(module_name) is None:
        raise ConfigError(f"stage {stage!r} is not part of this build yet ({module_name} is missing)")
    return importlib.import_module(module_name).run


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "recipes":
        for name, fn in RECIPES.items():
            print(f"{name:10s} {(fn.__doc__ or '').strip()}")
        return 0
    if args.command in ("report", "compare"):
        from prism_mcore import report

        try:
            text = report.finalize(args.run_dir) if args.command == "report" else report.comparison(
                args.baseline_dir, args.prism_dir)  # fmt: skip
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(text)
        return 0
    try:
        config = resolve_config(args.recipe, args.overrides)
        if args.command == "config":
            print(json.dumps(to_dict(config), indent=2))
            return 0
        stages = config.run.stages if args.command == "run" else [args.command]
        unknown = [stage for stage in stages if stage not in STAGES]
        if unknown:
            raise ConfigError(f"run.stages: unknown stage(s) {unknown}; allowed: {', '.join(STAGES)}")
        check_model_settings(config)
        check_schedules(config)
        runners = [_stage_runner(stage) for stage in stages]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        for runner in runners:
            runner(config)
    except RunFolderInUse as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    if args.command == "run" and global_rank() == 0:
        from prism_mcore import report

        print("\n" + report.finalize(config.run.output_dir), flush=True)
    from prism_mcore.runtime import shutdown

    shutdown()
    return 0
