"""Typed configuration of a prism_mcore run.

One `Config` describes a whole PRISM run: the shared sections (`run`, `model`, `parallel`, `data`, `rollout`) and
one section per stage (`sft`, `warmup`, `align`, `rlvr`), each nesting its optimizer settings (`optim`; the
alignment stage has `policy_optim` and `discriminator_optim`) and, for the RL stages, their `policy_loss`. A recipe is
a Python function returning a `Config` (see `recipes.py`); variants are made by changing a base config, on the
command line by dotted overrides such as `rlvr.optim.lr=1e-6` (see `overrides.py`).

Defaults are the released PRISM hyper-parameters (PRISM_SPEC §2.5, §3, §4, §5); the embedded recipe shrinks sizes
and lengths, never the algorithm. `check_ranges` (every value in its range, every float finite) and
`check_token_budgets` (each stage's micro-batch budget holds its longest sample) refuse a config with one line naming
the key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

from prism_mcore.algorithms.advantages import AdvantageMode
from prism_mcore.algorithms.policy_loss import POLICY_LOSS_PRESETS, LossAggregation
from prism_mcore.config.overrides import ConfigError

STAGES = ("sft", "warmup", "align", "rlvr")

# Allowed values that other modules also enumerate are written once. The algorithms' registries give the policy-loss
# presets, aggregation modes and alignment-advantage modes; the data modules take these three from here.
PolicyLossPreset = Literal[tuple(POLICY_LOSS_PRESETS)]
Aggregation = Literal[tuple(mode.value for mode in LossAggregation)]
AdvantageModeName = Literal[tuple(mode.value for mode in AdvantageMode)]
OverLength = Literal["filter", "truncate"]  # what happens to an over-long SFT sequence or teacher segment
OnError = Literal["raise", "skip"]  # what a bad data row does: stop the run, or be counted and skipped
ImageBackend = Literal["auto", "hf", "dali"]  # image decode: DALI on GPU when installed (auto), or the HF processor


@dataclass
class RunConfig:
    """Where a run writes and how it identifies itself."""

    name: str = "prism"
    output_dir: str = "runs/prism"  # run folder: config.json, metrics.jsonl, checkpoints/, summary.json, plots
    seed: int = 42
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # the stages `run` executes, in order
    log_every: int = 1
    keep_last: int = 2  # step checkpoints kept per stage
    # A stage stops (no `.done`) once more than this share of its steps skipped the update for a non-finite gradient.
    max_skipped_step_fraction: float = 0.1
    tensorboard: bool = True  # used when the tensorboard package is installed


@dataclass
class ModelConfig:
    """The policy and discriminator checkpoints (HF folders) and how they are built on Megatron."""

    policy_path: str = ""  # HF checkpoint folder of the (SFT) policy; empty means the embedded default
    discriminator_path: str = ""  # HF Qwen3-VL-MoE folder (upcycled); empty means the embedded default
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attention_backend: Literal["auto", "te", "sdpa"] = "auto"  # auto: TE when installed, else torch SDPA
    fp8: Literal["none", "delayed", "current"] = "none"  # needs Transformer Engine
    recompute_activations: bool = False
    moe_token_dispatcher: Literal["allgather", "alltoall"] = "allgather"


@dataclass
class ParallelConfig:
    """Model-parallel sizes; the data-parallel size is what remains of the world size."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    expert: int = 1
    context: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True  # used on GPU; the CPU path uses the standard Megatron optimizer
    timeout_minutes: int = 30


@dataclass
class DataConfig:
    """Dataset files and the length/validation policy. Empty paths mean the embedded default's files."""

    sft_path: str = ""
    sft_dataset: str = ""  # with sft_path a folder: the dataset's name in its dataset_info.json (LLaMA-Factory)
    warmup_path: str = ""
    align_path: str = ""
    rl_path: str = ""
    val_path: str = ""
    test_path: str = ""
    max_eval_prompts: int = 0  # evaluate on the first N prompts of val/test; 0: all
    max_prompt_length: int = 2048
    max_segment_length: int = 6144  # teacher caption/CoT and warmup segments (longer: `over_length`)
    over_length: OverLength = "filter"
    on_error: OnError = "raise"
    # A row larger than this (its JSONL line, or its parquet/JSON columns, embedded image bytes included) is refused
    # before it is parsed or tokenized: a `row_too_large` data error, raised or skipped by `on_error`.
    max_row_bytes: int = 32 * 2**20
    image_backend: ImageBackend = "auto"
    max_image_mb: float = 32.0  # one encoded image (file, URL or bytes); paths must be regular files
    image_url_deadline_s: float = 30.0  # a whole http(s) image fetch, however slowly its bytes come
    max_tokens_per_microbatch: int = 8192  # dynamic batch size: token budget per micro-batch and GPU


@dataclass
class RolloutConfig:
    """How responses are sampled: in-process engine or SGLang servers."""

    engine: Literal["local", "sglang"] = "local"
    n: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 6144
    server_urls: list[str] = field(default_factory=list)  # SGLang servers or one sglang-router URL
    weight_sync: Literal["tensor", "distributed", "disk"] = "tensor"
    request_timeout_s: float = 600.0
    max_retries: int = 3
    retry_backoff_s: float = 1.0  # first retry delay; doubles per consecutive failure of a server (at most 30 s)
    max_concurrent_requests: int = 0  # /generate requests in flight over all servers; 0: all of a call (prompts x n)
    server_ready_timeout_s: float = 600.0  # how long to wait for every server's /health_generate at start
    weight_sync_bucket_mb: int = 512  # tensor and distributed sync: tensors per request/broadcast round
    weight_sync_dir: str = ""  # disk sync: folder the servers can read; empty means <run.output_dir>/rollout_weights
    weight_sync_master_address: str = ""  # distributed sync: trainer address the servers reach; empty: this host
    weight_sync_master_port: int = 29600  # distributed sync: port of the trainer's rendezvous store
    local_max_batch_size: int = 64  # local engine: sequences per generate call
    # Colocated servers (sharing the trainer's GPUs) give their memory back while the trainer runs: released after
    # each generation, resumed before the next weight sync or generation (/release_ and /resume_memory_occupation).
    offload_during_training: bool = False
    tis_cap: float = 0.0  # truncated importance-sampling cap for rollout/trainer mismatch; 0 disables it


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0


@dataclass
class PolicyLossSettings:
    """The clipped policy loss: a released preset (PRISM_SPEC §4, §5.1), optionally with fields changed.

    Presets (algorithms/policy_loss.py): `prism_align` and `grpo` (clip 0.2/0.2, dual clip 3, token-mean), `dapo`
    (0.2/0.28, dual clip 10, token-mean), `gspo` (sequence ratio, 3e-4/4e-4, seq-mean-token-mean). Entropy bonus and
    KL are off in every released recipe and are not offered.
    """

    preset: PolicyLossPreset = "grpo"
    clip_low: float | None = None  # None: the preset's value
    clip_high: float | None = None
    dual_clip: float | None = None  # None: the preset's value; 0 disables the dual clip
    aggregation: Aggregation | None = None


@dataclass
class SFTConfig:
    """Stage 1: supervised fine-tuning on multimodal demonstrations (PRISM_SPEC §7)."""

    epochs: float = 1.0
    max_steps: int = 0  # 0: as many as `epochs` take
    global_batch_size: int = 128
    max_length: int = 8192
    eval_every: int = 0
    save_every: int = 500
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.01, schedule="cosine", warmup_ratio=0.1)
    )


@dataclass
class WarmupConfig:
    """Discriminator warmup: pairwise Bradley-Terry on caption and CoT pairs (PRISM_SPEC §2.5)."""

    epochs: float = 1.0
    max_steps: int = 0
    global_batch_size: int = 128  # pairs per step
    aux_loss_coef: float = 0.01
    max_image_side: int = 560
    self_play_pairs: int = 0  # > 0: also pair this many SFT-policy samples against the teacher demonstrations
    heldout_fraction: float = 0.05
    save_every: int = 500
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.01, schedule="cosine", warmup_ratio=0.1)
    )


@dataclass
class AlignConfig:
    """Stage 2: PRISM alignment against the MoE discriminator (PRISM_SPEC §3, §4)."""

    steps: int = 1500  # >= 1: a stage that should not train is left out of run.stages, not given 0 steps
    prompts_per_step: int = 4
    max_new_tokens: int = 6144
    save_every: int = 500
    eval_every: int = 8  # accuracy on the validation split every N steps (`val/*` metrics); 0: off
    val_before_train: bool = True  # also validate before the first step (logged as step 0)
    val_temperature: float = 0.0  # validation sampling (the released scripts' val_kwargs); 0: greedy
    val_top_p: float = 1.0
    val_max_new_tokens: int = 0  # 0: max_new_tokens
    max_tokens_per_microbatch: int = 0  # policy and D micro-batches; 0: data.max_tokens_per_microbatch
    caption_weight: float = 0.5
    cot_weight: float = 0.5
    format_penalty: float = 1.5
    # multi_reward is the released mode; the others combine D's scores with the rule reward (PRISM_SPEC §4 table)
    advantage_mode: AdvantageModeName = "multi_reward"
    score_clip: float = 10.0
    score_reg_coef: float = 0.001
    policy_loss: PolicyLossSettings = field(default_factory=lambda: PolicyLossSettings(preset="prism_align"))
    policy_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.01))
    # Between its own updates, each model keeps only its weights on the GPU: gradients and optimizer state wait in
    # host memory while the other model trains (training/offload.py; tools/memory_plan.py shows what it saves).
    offload_idle_states: bool = False
    discriminator_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.01))


@dataclass
class RLVRConfig:
    """Stage 3: RLVR with a rule-based verifiable reward (PRISM_SPEC §5, §6)."""

    steps: int = 1500  # >= 1: a stage that should not train is left out of run.stages, not given 0 steps
    prompts_per_step: int = 32
    max_new_tokens: int = 8192
    save_every: int = 120
    eval_every: int = 6  # accuracy on the validation split every N steps (`val/*` metrics); 0: off
    val_before_train: bool = True  # also validate before the first step (logged as step 0)
    val_temperature: float = 0.0  # validation sampling; 0: greedy (released DAPO and GSPO: 1.0, top_p 0.7)
    val_top_p: float = 1.0
    val_max_new_tokens: int = 0  # 0: max_new_tokens
    # verl's total_epochs: the run also stops after this many passes over the RL prompts, counted in whole batches
    # (generation batches with dynamic sampling) as verl's drop_last loader, when that comes before `steps`; 0: no cap
    max_epochs: int = 30
    # Released: 10240 (prompt 2048 + response 8192), GSPO 20480; 0: data.max_tokens_per_microbatch.
    max_tokens_per_microbatch: int = 10240
    dynamic_sampling: bool = False  # DAPO filter groups
    generation_prompts_per_step: int = 96
    max_generation_batches: int = 10
    overlong_buffer: int = 0  # DAPO overlong penalty buffer length in tokens; 0 disables it
    overlong_penalty_factor: float = 1.0
    offload_idle_states: bool = False  # gradients and optimizer state in host memory during rollouts
    policy_loss: PolicyLossSettings = field(default_factory=PolicyLossSettings)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.01))


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    rlvr: RLVRConfig = field(default_factory=RLVRConfig)


# --- allowed values ---------------------------------------------------------------------------------------------
# Checked by `check_ranges` after every recipe and override, so a value that would fail (or train on nothing) many
# minutes later stops the run at once with one line naming the key. Every float of the config must also be finite.

OPTIM_SECTIONS = ("sft.optim", "warmup.optim", "align.policy_optim", "align.discriminator_optim", "rlvr.optim")
POLICY_LOSS_SECTIONS = ("align.policy_loss", "rlvr.policy_loss")


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value >= low), f">= {low:g}"


def _above(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value > low), f"> {low:g}"


def _within(low: float, high: float, closed_high: bool = False) -> tuple[Callable[[Any], bool], str]:
    if closed_high:
        return (lambda value: low <= value <= high), f"in [{low:g}, {high:g}]"
    return (lambda value: low <= value < high), f"in [{low:g}, {high:g})"


_OPTIONAL = (lambda value: value is None or value >= 1), ">= 1 (or none)"
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "run.log_every": _at_least(1),
    "run.keep_last": _at_least(1),
    "run.seed": _at_least(0),
    "run.max_skipped_step_fraction": _within(0, 1, closed_high=True),
    "parallel.tensor": _at_least(1),
    "parallel.pipeline": _at_least(1),
    "parallel.virtual_pipeline": _OPTIONAL,
    "parallel.expert": _at_least(1),
    "parallel.context": _at_least(1),
    "parallel.timeout_minutes": _at_least(1),
    "data.max_eval_prompts": _at_least(0),
    "data.max_prompt_length": _at_least(1),
    "data.max_segment_length": _at_least(1),
    "data.max_tokens_per_microbatch": _at_least(1),
    "data.max_row_bytes": _at_least(1),
    "rollout.n": _at_least(1),
    "rollout.temperature": _at_least(0),
    "rollout.top_p": _within(0, 1, closed_high=True),
    "rollout.top_k": ((lambda value: value == -1 or value >= 1), "-1 (off) or >= 1"),
    "rollout.max_new_tokens": _at_least(1),
    "rollout.request_timeout_s": _above(0),
    "rollout.max_retries": _at_least(0),
    "rollout.retry_backoff_s": _at_least(0),
    "rollout.max_concurrent_requests": _at_least(0),  # 0: every request of a call in flight
    "rollout.server_ready_timeout_s": _above(0),
    "rollout.weight_sync_bucket_mb": _at_least(1),
    "rollout.weight_sync_master_port": _within(1, 65535, closed_high=True),
    "rollout.local_max_batch_size": _at_least(1),
    "rollout.tis_cap": _at_least(0),
    "sft.epochs": _above(0),
    "sft.max_steps": _at_least(0),
    "sft.global_batch_size": _at_least(1),
    "sft.max_length": _at_least(1),
    "sft.eval_every": _at_least(0),
    "sft.save_every": _at_least(0),
    "warmup.epochs": _above(0),
    "warmup.max_steps": _at_least(0),
    "warmup.global_batch_size": _at_least(1),
    "warmup.aux_loss_coef": _at_least(0),
    "warmup.max_image_side": _at_least(32),
    "warmup.self_play_pairs": _at_least(0),
    "warmup.heldout_fraction": _within(0, 1),
    "warmup.save_every": _at_least(0),
    "align.steps": _at_least(1),
    "align.prompts_per_step": _at_least(1),
    "align.max_new_tokens": _at_least(1),
    "align.save_every": _at_least(0),
    "align.eval_every": _at_least(0),
    "align.max_tokens_per_microbatch": _at_least(0),
    "align.caption_weight": _at_least(0),
    "align.cot_weight": _at_least(0),
    "align.format_penalty": _at_least(0),
    "align.score_clip": _above(0),
    "align.score_reg_coef": _at_least(0),
    "rlvr.steps": _at_least(1),
    "rlvr.prompts_per_step": _at_least(1),
    "rlvr.max_new_tokens": _at_least(1),
    "rlvr.save_every": _at_least(0),
    "rlvr.eval_every": _at_least(0),
    "rlvr.max_tokens_per_microbatch": _at_least(0),
    "rlvr.generation_prompts_per_step": _at_least(1),
    "rlvr.max_generation_batches": _at_least(1),
    "rlvr.overlong_buffer": _at_least(0),
    "rlvr.overlong_penalty_factor": _at_least(0),
    **{
        f"{section}.{name}": rule
        for section in OPTIM_SECTIONS
        for name, rule in (
            ("lr", _at_least(0)),
            ("min_lr", _at_least(0)),
            ("weight_decay", _at_least(0)),
            ("beta1", _within(0, 1)),
            ("beta2", _within(0, 1)),
            ("eps", _above(0)),
            ("clip_grad", _at_least(0)),
            ("warmup_steps", _at_least(0)),
            ("warmup_ratio", _within(0, 1)),
        )
    },
    **{
        f"{section}.{name}": ((lambda value: value is None or value >= 0), ">= 0 (or none)")
        for section in POLICY_LOSS_SECTIONS
        for name in ("clip_low", "clip_high")
    },
    **{
        f"{section}.dual_clip": ((lambda value: value is None or value == 0 or value > 1), "> 1, 0 (off) or none")
        for section in POLICY_LOSS_SECTIONS
    },
}


def _value(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _floats(node: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    for item in fields(node):
        value = getattr(node, item.name)
        if is_dataclass(value):
            yield from _floats(value, f"{prefix}{item.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{item.name}", value


def check_ranges(config: Config) -> None:
    """Raise `ConfigError` naming the first key whose value is out of its range (or not finite)."""
    for key, value in _floats(config):
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
    for key, (allowed, expectation) in RANGES.items():
        value = _value(config, key)
        if not allowed(value):
            raise ConfigError(f"{key}={value} is out of range: must be {expectation}")
    if not config.run.stages:
        raise ConfigError(f"run.stages is empty: list at least one of {', '.join(STAGES)}")


def check_token_budgets(config: Config, stages: Sequence[str]) -> None:
    """Raise `ConfigError` when a stage's token budget per micro-batch cannot hold the longest sample it may build
    (the micro-batching would otherwise refuse it only when such a sample appears, possibly hours in)."""
    data = config.data
    longest = {
        "sft": ("sft.max_length", config.sft.max_length),
        "align": (
            "data.max_prompt_length + align.max_new_tokens",
            data.max_prompt_length + config.align.max_new_tokens,
        ),
        "rlvr": ("data.max_prompt_length + rlvr.max_new_tokens", data.max_prompt_length + config.rlvr.max_new_tokens),
    }
    own_budget = {"align": config.align.max_tokens_per_microbatch, "rlvr": config.rlvr.max_tokens_per_microbatch}
    for stage in stages:
        if stage not in longest:
            continue
        what, tokens = longest[stage]
        if own_budget.get(stage):  # a stage's own budget replaces the data budget
            key, budget = f"{stage}.max_tokens_per_microbatch", own_budget[stage]
        else:
            key, budget = "data.max_tokens_per_microbatch", data.max_tokens_per_microbatch
        if budget < tokens:
            raise ConfigError(f"{key}={budget} cannot hold the longest {stage} sample: {what} = {tokens} tokens")
