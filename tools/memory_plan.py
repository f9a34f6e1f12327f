"""Per-GPU memory of a recipe's training phases: will it fit, and how much is left for activations?

    python tools/memory_plan.py qwen3vl_4b_grpo                              # a released recipe (examples/recipes/)
    python tools/memory_plan.py qwen3vl_8b_grpo --gpus 8 --gpu-gib 79.6
    python tools/memory_plan.py qwen3vl_4b_grpo align.offload_idle_states=false   # any dotted override
    python tools/memory_plan.py embedded --policy-config runs/embedded/hf/sft     # shapes from an HF folder

For every phase of every stage the recipe runs, one row per model resident on the GPU and a total: weights,
gradients, optimizer state and an activation estimate, against the GPU's memory. Shapes come from the HF
`config.json` of `--policy-config` / `--discriminator-config` (or the recipe's model paths when they are folders),
else from the published Qwen3-VL shape named in the recipe (2b/4b/8b; the discriminator is Qwen3-VL-2B upcycled to
4 experts, top-2, PRISM_SPEC §2.1). Parameter counts are those of transformers' models of the same config
(`tests/unit/test_memory_plan.py` checks them on the meta device).

What one parameter costs (Megatron DDP with fp32 gradient buffers, `training/step.py`; mixed-precision AdamW):
    weights    2 bytes (bf16) on GPUs, 4 (fp32) with model.dtype=float32
    gradients  4 bytes (fp32 buffer, `grad_reduce_in_fp32`)
    optimizer  12 bytes (fp32 master weight + two AdamW moments; 8 when the weights are fp32 already),
               divided by the data-parallel size under the distributed optimizer (`parallel.distributed_optimizer`)
Parameters are divided by TP x PP (the first pipeline stage holds the embedding and the vision tower and is the one
reported), expert parameters also by EP. With `align.offload_idle_states` the model that is idle in a phase keeps
only its weights on the GPU (`training/offload.py`: gradients and optimizer state go to host memory).

Activations (an estimate, bf16 elements kept for the backward pass per token and layer, flash/SDPA attention so no
[s x s] scores, no dropout; TP divides the attention and MLP terms, and the norm terms too under sequence
parallelism, which Megatron-Bridge turns on for the MoE discriminator at TP > 1):
    dense layer   4h + (2n_q + 3n_kv)d + n_q*d + 3f      (norm inputs/outputs, q/k before and after their norms, v,
                                                          attention output, SwiGLU gate, up and product)
    MoE layer     attention as above + k(h + 3f_e) + h + 2E (each token's copy per chosen expert, router logits fp32)
    vision block  8h_v + 2f_v per patch (4 patches per merged image token)
    recompute     only each layer's input (h per token and layer) plus one layer's activations
A micro-batch holds `max_tokens_per_microbatch` tokens (the stage's budget) of sequences of `--sequence-tokens`
tokens, each with one image of `--image-tokens` merged tokens. Log-probs never hold [tokens x vocab] logits (the
fused kernel works in vocabulary chunks), so no logits row is counted. The CUDA context, NCCL buffers and allocator
slack are a fixed `--reserve-gib`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark import DISCRIMINATOR_SHAPES, POLICY_SHAPES, ModelShape  # noqa: E402

from prism_mcore.config import apply_overrides, load_recipe  # noqa: E402
from prism_mcore.config.schema import Config  # noqa: E402

GIB = 1024**3
H100_80GB_GIB = 81559 / 1024  # what nvidia-smi reports for an 80 GB H100: 81,559 MiB


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a Qwen3-VL (MoE) model by where they live."""

    layers: int  # language layers, experts excluded
    experts: int  # MoE expert weights (divided by EP as well)
    first_stage: int  # embedding and vision tower (on the first pipeline stage)
    last_stage: int  # final norm and output layer or value head (on the last pipeline stage)

    @property
    def total(self) -> int:
        return self.layers + self.experts + self.first_stage + self.last_stage


def count_parameters(
    shape: ModelShape, value_head: bool = False, num_position_embeddings: int = 2304
) -> ParameterCount:
    """Parameters of `shape` at its full depth (`published_layers`), as transformers builds the model.

    `value_head`: the discriminator, whose vocabulary projection is a Linear(H, 1) (its untied lm_head dropped)."""
    h, d, f = shape.hidden, shape.head_dim, shape.ffn
    attention = h * d * (2 * shape.heads + 2 * shape.kv_heads) + 2 * d + 2 * h  # q, k, v, o, q/k norms, 2 norms
    mlp = 3 * h * f
    experts = 0
    if shape.experts:
        experts = shape.published_layers * shape.experts * mlp
        mlp = h * shape.experts  # the router; the expert weights are counted apart
    hv, fv, merged = shape.vision_hidden, shape.vision_ffn, shape.merge**2 * shape.vision_hidden
    block = 4 * hv + (3 * hv * hv + 3 * hv) + (hv * hv + hv) + (2 * hv * fv + fv + hv)
    merger = merged * merged + merged + merged * h + h  # fc1 and fc2 with biases
    vision = (
        shape.patch_dim * hv + hv  # patch embedding (a Conv3d with bias)
        + num_position_embeddings * hv
        + shape.vision_depth * block
        + (merger + 2 * hv)  # the final merger normalises before the 2x2 shuffle
        + len(shape.deepstack) * (merger + 2 * merged)  # deepstack mergers normalise after it
    )  # fmt: skip
    embedding = shape.vocab * h
    if value_head:
        output = h
    else:
        output = 0 if shape.tie_embeddings else shape.vocab * h
    return ParameterCount(
        layers=shape.published_layers * (attention + mlp),
        experts=experts,
        first_stage=embedding + vision,
        last_stage=h + output,
    )


@dataclass(frozen=True)
class Layout:
    gpus: int
    tensor: int
    pipeline: int
    expert: int
    distributed_optimizer: bool
    bf16: bool
    recompute: bool
    sequence_parallel: bool

    @property
    def data(self) -> int:
        return self.gpus // (self.tensor * self.pipeline)


@dataclass(frozen=True)
class ModelMemory:
    """Bytes one GPU holds for one model (the first pipeline stage)."""

    weights: float
    gradients: float
    optimizer: float


def model_memory(params: ParameterCount, layout: Layout) -> ModelMemory:
    dense = (params.layers / layout.pipeline + params.first_stage) / layout.tensor
    experts = params.experts / (layout.pipeline * layout.tensor * layout.expert)
    local = dense + experts
    expert_data = max(layout.gpus // (layout.pipeline * layout.tensor * layout.expert), 1)
    optimizer_bytes = 12 if layout.bf16 else 8
    if layout.distributed_optimizer:
        optimizer = optimizer_bytes * (dense / layout.data + experts / expert_data)
    else:
        optimizer = optimizer_bytes * local
    return ModelMemory(weights=(2 if layout.bf16 else 4) * local, gradients=4 * local, optimizer=optimizer)


def activation_bytes(shape: ModelShape, tokens: int, layout: Layout, sequence_tokens: int, image_tokens: int) -> float:
    """The activation estimate of the module docstring for one micro-batch of `tokens` tokens."""
    h, d, tp = shape.hidden, shape.head_dim, layout.tensor
    # Norm inputs/outputs are split over TP only with sequence parallelism; the rest always is.
    replicated = 4 * h / (tp if layout.sequence_parallel or shape.experts else 1)
    split = ((2 * shape.heads + 3 * shape.kv_heads) * d + shape.heads * d) / tp
    if shape.experts:
        layer = replicated + split + (shape.top_k * (h + 3 * shape.ffn) + h + 2 * shape.experts) / tp
    else:
        layer = replicated + split + 3 * shape.ffn / tp
    layers = shape.published_layers / layout.pipeline
    if layout.recompute:
        text = tokens * (layers * h / tp + layer)
    else:
        text = tokens * layers * layer
    images = -(-tokens // sequence_tokens)
    patches = images * image_tokens * shape.merge**2
    vision = patches * shape.vision_depth * (8 * shape.vision_hidden + 2 * shape.vision_ffn)
    return 2 * (text + vision / tp)


def shape_from_hf(path: str | Path, name: str) -> ModelShape:
    """The shape of an HF Qwen3-VL / Qwen3-VL-MoE folder (or its config.json)."""
    path = Path(path)
    config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    text, vision = config["text_config"], config["vision_config"]
    base = POLICY_SHAPES["2b"]
    return replace(
        base,
        name=name,
        hidden=text["hidden_size"],
        layers=text["num_hidden_layers"],
        published_layers=text["num_hidden_layers"],
        ffn=text.get("moe_intermediate_size") or text["intermediate_size"],
        heads=text["num_attention_heads"],
        kv_heads=text["num_key_value_heads"],
        head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        vocab=text["vocab_size"],
        tie_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        vision_depth=vision["depth"],
        vision_hidden=vision["hidden_size"],
        vision_ffn=vision["intermediate_size"],
        vision_heads=vision["num_heads"],
        deepstack=tuple(vision.get("deepstack_visual_indexes", ())),
        experts=text.get("num_experts", 0),
        top_k=text.get("num_experts_per_tok", 0) if text.get("num_experts") else 0,
        patch=vision["patch_size"],
        temporal_patch=vision["temporal_patch_size"],
        merge=vision["spatial_merge_size"],
        in_channels=vision["in_channels"],
    )


def published_size(config: Config) -> str:
    """The Qwen3-VL size a released recipe names (`qwen3vl_4b_grpo` -> 4b); 4b otherwise."""
    for size in ("8b", "4b", "2b"):
        if f"_{size}_" in f"_{config.run.name}_":
            return size
    return "4b"


def _folder_or_none(path: str) -> str | None:
    return path if path and (Path(path) / "config.json").exists() else None


@dataclass(frozen=True)
class Row:
    stage: str
    phase: str
    parts: dict[str, float]  # label -> bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def plan(config: Config, policy: ModelShape, discriminator: ModelShape, layout: Layout, args) -> list[Row]:
    """The memory rows of every phase of every stage `config` runs."""
    policy_memory = model_memory(count_parameters(policy), layout)
    disc_memory = model_memory(count_parameters(discriminator, value_head=True), layout)
    reserve = args.reserve_gib * GIB
    data_budget = config.data.max_tokens_per_microbatch

    def activations(shape: ModelShape, budget: int) -> float:
        return activation_bytes(shape, budget or data_budget, layout, args.sequence_tokens, args.image_tokens)

    def training(memory: ModelMemory) -> dict[str, float]:
        return {"weights": memory.weights, "gradients": memory.gradients, "optimizer": memory.optimizer}

    def idle(memory: ModelMemory, offloaded: bool) -> dict[str, float]:
        return {"weights": memory.weights} if offloaded else training(memory)

    def row(stage: str, phase: str, models: dict[str, dict[str, float]], activation: float) -> Row:
        parts = {f"{name} {kind}": value for name, kinds in models.items() for kind, value in kinds.items()}
        return Row(stage, phase, {**parts, "activations": activation, "reserve": reserve})

    rows = []
    for stage in config.run.stages:
        if stage == "sft":
            rows.append(row("sft", "train", {"policy": training(policy_memory)}, activations(policy, 0)))
        elif stage == "warmup":
            rows.append(row("warmup", "train", {"D": training(disc_memory)}, activations(discriminator, 0)))
        elif stage == "align":
            offload = config.align.offload_idle_states
            budget = config.align.max_tokens_per_microbatch
            resident = {"policy": idle(policy_memory, offload), "D": idle(disc_memory, offload)}
            rows.append(row("align", "rollout (trainer side)", resident, 0.0))
            rows.append(
                row(
                    "align",
                    "D score + update",
                    {"policy": idle(policy_memory, offload), "D": training(disc_memory)},
                    activations(discriminator, budget),
                )
            )
            rows.append(
                row(
                    "align",
                    "policy update",
                    {"policy": training(policy_memory), "D": idle(disc_memory, offload)},
                    activations(policy, budget),
                )
            )
        elif stage == "rlvr":
            offload = config.rlvr.offload_idle_states
            rows.append(row("rlvr", "rollout (trainer side)", {"policy": idle(policy_memory, offload)}, 0.0))
            budget = config.rlvr.max_tokens_per_microbatch
            rows.append(row("rlvr", "policy update", {"policy": training(policy_memory)}, activations(policy, budget)))
    return rows


def format_table(rows: list[Row], gpu_gib: float) -> list[str]:
    kinds = ("weights", "gradients", "optimizer")
    header = ["stage", "phase", "policy w/g/o", "D w/g/o", "activations", "reserve", "total", f"free of {gpu_gib:.1f}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]

    def model(row: Row, name: str) -> str:
        values = [row.parts.get(f"{name} {kind}") for kind in kinds]
        if all(v is None for v in values):
            return "-"
        return " / ".join("0" if v is None else f"{v / GIB:.1f}" for v in values)

    for row in rows:
        free = gpu_gib - row.total / GIB
        cells = [
            row.stage,
            row.phase,
            model(row, "policy"),
            model(row, "D"),
            f"{row.parts['activations'] / GIB:.1f}",
            f"{row.parts['reserve'] / GIB:.1f}",
            f"{row.total / GIB:.1f}",
            f"{free:.1f}" + ("" if free >= 0 else " (does not fit)"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a recipe name (examples/recipes/NAME.py or a registered one) or a file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. align.offload_idle_states=false")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the job (data parallel = gpus / (TP x PP))")
    parser.add_argument("--gpu-gib", type=float, default=H100_80GB_GIB, help="memory of one GPU (H100 80 GB)")
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="CUDA context, NCCL, allocator slack")
    parser.add_argument("--sequence-tokens", type=int, default=2048, help="tokens of a typical sequence")
    parser.add_argument("--image-tokens", type=int, default=256, help="merged tokens of one image")
    parser.add_argument("--policy-config", default="", help="HF folder or config.json of the policy")
    parser.add_argument("--discriminator-config", default="", help="HF folder or config.json of D")
    return parser.parse_args(argv)


def resolve_recipe(name: str) -> str:
    """A released recipe's file when `name` is one of examples/recipes/, else `name` unchanged."""
    released = Path(__file__).resolve().parent.parent / "examples" / "recipes" / f"{name}.py"
    return str(released) if released.exists() else name


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    config = apply_overrides(load_recipe(resolve_recipe(args.recipe)), args.overrides)
    size = published_size(config)
    policy_path = args.policy_config or _folder_or_none(config.model.policy_path)
    disc_path = args.discriminator_config or _folder_or_none(config.model.discriminator_path)
    policy = shape_from_hf(policy_path, "policy") if policy_path else POLICY_SHAPES[size]
    discriminator = shape_from_hf(disc_path, "D") if disc_path else DISCRIMINATOR_SHAPES["2b"]
    parallel = config.parallel
    if args.gpus % (parallel.tensor * parallel.pipeline):
        raise SystemExit(f"--gpus {args.gpus} is not a multiple of TP x PP = {parallel.tensor * parallel.pipeline}")
    layout = Layout(
        gpus=args.gpus,
        tensor=parallel.tensor,
        pipeline=parallel.pipeline,
        expert=parallel.expert,
        distributed_optimizer=parallel.distributed_optimizer,
        bf16=config.model.dtype != "float32",
        recompute=config.model.recompute_activations,
        sequence_parallel=parallel.sequence_parallel or parallel.tensor == 1,
    )
    rows = plan(config, policy, discriminator, layout, args)
    policy_params = count_parameters(policy).total
    disc_params = count_parameters(discriminator, value_head=True).total
    print(
        f"{args.recipe}: policy {policy.name} {policy_params / 1e9:.2f}B parameters, "
        f"D {discriminator.label.split(' (')[0]} {disc_params / 1e9:.2f}B; {args.gpus} GPUs of {args.gpu_gib:.1f} GiB, "
        f"TP {layout.tensor} PP {layout.pipeline} EP {layout.expert} DP {layout.data}, "
        f"distributed optimizer {'on' if layout.distributed_optimizer else 'off'}, "
        f"recompute {'on' if layout.recompute else 'off'}, "
        f"offload idle states: align {'on' if config.align.offload_idle_states else 'off'}, "
        f"rlvr {'on' if config.rlvr.offload_idle_states else 'off'}"
    )
    print(
        f"GiB per GPU (w/g/o = weights / gradients / optimizer); activations: one micro-batch of the stage's token "
        f"budget, {args.sequence_tokens}-token sequences with a {args.image_tokens}-token image each"
    )
    print("\n".join(format_table(rows, args.gpu_gib)))
    return rows


if __name__ == "__main__":
    main()
