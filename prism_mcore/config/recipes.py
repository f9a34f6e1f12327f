"""Named recipes: Python functions that return a `Config`.

`embedded` is the default: the whole pipeline on the tiny models and synthetic task built locally, sized to finish
on a 2-core CPU in minutes. `prism` is the released PRISM setting (PRISM_SPEC §2-§5) with its defaults untouched;
cluster recipes in examples/recipes/ start from it. A recipe may also be a file: a `.py` file defining `recipe()`,
or a `.json` config (for instance a run folder's saved `config.json`). The released recipe files are also taken by
name (`qwen3vl_4b_grpo` for examples/recipes/qwen3vl_4b_grpo.py), as examples/run_prism.sh takes them.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

from prism_mcore.config.overrides import ConfigError, apply_dict
from prism_mcore.config.schema import Config

RECIPES: dict[str, Callable[[], Config]] = {}
RECIPE_DIR = Path(__file__).resolve().parents[2] / "examples" / "recipes"  # the released recipe files


def released_recipe_files() -> list[Path]:
    """The released recipe files (none when the package runs without its examples folder)."""
    return sorted(RECIPE_DIR.glob("*.py")) if RECIPE_DIR.is_dir() else []


def register(fn: Callable[[], Config]) -> Callable[[], Config]:
    RECIPES[fn.__name__] = fn
    return fn


@register
def prism() -> Config:
    """The released PRISM hyper-parameters (Qwen3-VL-4B policy, 2B->MoE discriminator; set model paths)."""
    return Config()


@register
def embedded() -> Config:
    """All stages on the embedded tiny Qwen3-VL and synthetic visual-reasoning task, on one CPU machine."""
    config = Config()
    config.run.name = "embedded"
    config.run.output_dir = "runs/embedded"
    config.run.log_every = 10
    config.data.max_prompt_length = 256
    config.data.max_segment_length = 128
    config.data.max_tokens_per_microbatch = 2048
    config.rollout.n = 8
    config.rollout.max_new_tokens = 128
    config.align.max_new_tokens = 128
    config.rlvr.max_new_tokens = 128
    config.sft.global_batch_size = 16
    config.sft.max_length = 384
    config.sft.epochs = 2.0
    config.sft.save_every = 200
    config.sft.optim.lr = 2e-3
    config.warmup.global_batch_size = 16
    config.warmup.optim.lr = 5e-4
    config.warmup.self_play_pairs = 256
    config.warmup.save_every = 100
    config.align.steps = 30
    config.align.prompts_per_step = 8
    config.align.save_every = 10
    config.align.eval_every = 0
    config.align.val_before_train = False
    config.align.policy_optim.lr = 2e-5
    config.align.discriminator_optim.lr = 1e-4
    config.rlvr.steps = 30
    config.rlvr.max_tokens_per_microbatch = 0  # the data budget, as every other embedded stage
    config.rlvr.prompts_per_step = 8
    config.rlvr.save_every = 10
    config.rlvr.eval_every = 0
    config.rlvr.val_before_train = False
    config.rlvr.optim.lr = 2e-5
    return config


def qwen3vl_cluster(size: str = "4b", rl: str = "grpo", with_prism: bool = True) -> Config:
    """The released scripts' setting for Qwen3-VL-`size` on 8 H100s (PRISM_SPEC §4, §5.1), GRPO, DAPO or GSPO.

    Checkpoints and data are site-specific: pass `model.policy_path` (the Qwen3-VL-Instruct start, or an SFT
    checkpoint with `run.stages=align,rlvr`), `model.discriminator_path` (tools/upcycle_moe.py output), the `data.*`
    files and `rollout.server_urls` (SGLang servers started with the policy checkpoint).
    `with_prism=False` is the SFT -> RLVR baseline without stage 2.
    """
    if size not in ("4b", "8b") or rl not in ("grpo", "dapo", "gspo"):
        raise ConfigError(f"no released recipe for Qwen3-VL-{size} with {rl}")
    config = Config()
    config.run.name = f"qwen3vl_{size}_{rl}" + ("" if with_prism else "_baseline")
    config.run.output_dir = f"runs/{config.run.name}"
    config.run.stages = ["sft", "warmup", "align", "rlvr"] if with_prism else ["sft", "rlvr"]
    config.parallel.tensor = 1 if size == "4b" else 2
    config.rollout.engine = "sglang"
    config.rollout.weight_sync = "tensor"
    config.data.max_prompt_length = 2048
    config.data.max_segment_length = 8192
    config.data.max_tokens_per_microbatch = 8192  # SFT, warmup and alignment (policy and D): 8192 tokens per GPU
    config.rlvr.max_tokens_per_microbatch = 20480 if rl == "gspo" else 10240  # PRISM_SPEC §5.1
    config.rollout.offload_during_training = True  # colocated SGLang servers (tensor weight sync)
    # Policy and D training states together fill an 80 GB H100 (tools/memory_plan.py): keep the idle one's
    # gradients and optimizer state in host memory.
    config.align.offload_idle_states = True
    config.rlvr.offload_idle_states = True
    # Without recomputation one 8192-token micro-batch's activations (about 30 GiB at 4B) leave 3 GiB free in
    # alignment, and GSPO's 20480-token micro-batches do not fit at all (tools/memory_plan.py, BENCHMARKS.md).
    config.model.recompute_activations = True
    config.rlvr.policy_loss.preset = rl
    config.rlvr.optim.weight_decay = 0.01 if rl == "grpo" else 0.1
    if rl == "dapo":
        config.rlvr.optim.warmup_steps = 10
        config.rlvr.dynamic_sampling = True
        config.rlvr.overlong_buffer = 4096
        config.rlvr.overlong_penalty_factor = 1.0
    if rl == "gspo":
        config.rlvr.optim.warmup_ratio = 0.05
    if rl in ("dapo", "gspo"):  # their val_kwargs: sampled validation; GRPO validates greedily
        config.rlvr.val_temperature = 1.0
        config.rlvr.val_top_p = 0.7
    return config


def load_recipe(name_or_path: str) -> Config:
    """A registered recipe by name, or a recipe file (`.py` with `recipe()`, or `.json`)."""
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]()
    path = Path(name_or_path)
    released = {file.stem: file for file in released_recipe_files()}
    if not path.exists() and name_or_path in released:
        path = released[name_or_path]
    if not path.exists():
        names = ", ".join([*sorted(RECIPES), *released])
        raise ConfigError(f"unknown recipe {name_or_path!r}: not a file and not one of {names}")
    if path.suffix == ".json":
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return apply_dict(Config(), values)
    if path.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"prism_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "recipe", None)):
            raise ConfigError(f"{path}: a recipe file must define recipe() -> Config")
        config = module.recipe()
        if not isinstance(config, Config):
            raise ConfigError(f"{path}: recipe() returned {type(config).__name__}, not Config")
        return config
    raise ConfigError(f"{path}: a recipe file must be .py (defining recipe()) or .json")
