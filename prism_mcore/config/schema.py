"""Typed configuration of a prism_mcore run.

One `Config` describes a whole PRISM run: the shared sections (`run`, `model`, `parallel`, `data`, `rollout`) and
one section per stage (`sft`, `warmup`, `align`, `rlvr`), each nesting its own `optim` (and, for the RL stages,
`algorithm`). A recipe is a Python function returning a `Config` (see `recipes.py`); variants are made by changing a
base config, on the command line by dotted overrides such as `align.optim.lr=1e-6` (see `overrides.py`).

Defaults are the released PRISM hyper-parameters (PRISM_SPEC §2.5, §3, §4, §5); the embedded recipe shrinks sizes
and lengths, never the algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

STAGES = ("sft", "warmup", "align", "rlvr")


@dataclass
class RunConfig:
    """Where a run writes and how it identifies itself."""

    name: str = "prism"
    output_dir: str = "runs/prism"  # run folder: config.json, metrics.jsonl, checkpoints/, summary.json, plots
    seed: int = 42
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # the stages `run` executes, in order
    log_every: int = 1
    keep_last: int = 2  # step checkpoints kept per stage
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
    max_response_length: int = 6144
    over_length: Literal["filter", "truncate"] = "filter"
    on_error: Literal["raise", "skip"] = "raise"
    image_backend: Literal["auto", "hf", "dali"] = "auto"
    max_tokens_per_microbatch: int = 8192  # dynamic batch size: token budget per micro-batch and GPU
    packing: bool = True


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

    preset: Literal["prism_align", "grpo", "dapo", "gspo"] = "grpo"
    clip_low: float | None = None  # None: the preset's value
    clip_high: float | None = None
    dual_clip: float | None = None  # None: the preset's value; 0 disables the dual clip
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "global-token-mean"] | None = None


@dataclass
class SFTConfig:
    """Stage 1: supervised fine-tuning on multimodal demonstrations (PRISM_SPEC §7)."""

    epochs: float = 1.0
    max_steps: int = 0  # 0: as many as `epochs` take
    global_batch_size: int = 128
    micro_batch_size: int = 4
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
    micro_batch_size: int = 4
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

    steps: int = 1500
    prompts_per_step: int = 4
    max_new_tokens: int = 6144
    save_every: int = 500
    eval_every: int = 8  # greedy accuracy on the validation split every N steps (`val/*` metrics); 0: off
    max_tokens_per_microbatch: int = 0  # policy and D micro-batches; 0: data.max_tokens_per_microbatch
    caption_weight: float = 0.5
    cot_weight: float = 0.5
    format_penalty: float = 1.5
    # multi_reward is the released mode; the others combine D's scores with the rule reward (PRISM_SPEC §4 table)
    advantage_mode: Literal["multi_reward", "sign_align", "rlvr_v2", "rlvr", "gated_align", "acc_gating"] = (
        "multi_reward"
    )
    score_clip: float = 10.0
    score_reg_coef: float = 0.001
    policy_loss: PolicyLossSettings = field(default_factory=lambda: PolicyLossSettings(preset="prism_align"))
    policy_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.01))
    discriminator_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.01))


@dataclass
class RLVRConfig:
    """Stage 3: RLVR with a rule-based verifiable reward (PRISM_SPEC §5, §6)."""

    steps: int = 1500
    prompts_per_step: int = 32
    max_new_tokens: int = 8192
    save_every: int = 500
    eval_every: int = 8  # greedy accuracy on the validation split every N steps (`val/*` metrics); 0: off
    max_tokens_per_microbatch: int = 0  # 0: data.max_tokens_per_microbatch (released: 10240, GSPO 20480)
    dynamic_sampling: bool = False  # DAPO filter groups
    generation_prompts_per_step: int = 96
    max_generation_batches: int = 10
    overlong_buffer: int = 0  # DAPO overlong penalty buffer length in tokens; 0 disables it
    overlong_penalty_factor: float = 1.0
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
