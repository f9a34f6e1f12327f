"""Throughput of prism_mcore's training steps on Qwen3-VL shapes, against transformers on the same device and run.

    python tools/benchmark.py                                  # GPU: 2B, 4B, 8B shapes; CPU: the tiny shape
    python tools/benchmark.py --shapes 2b --workloads sft,rl   # a part of the GPU run
    python tools/benchmark.py --shapes tiny --steps 1 --warmup 1 --out /tmp/B.md --json /tmp/B.json
    python tools/benchmark.py --workloads align-d,align-step --align-n 4,8,16   # not in the default run

Workloads (one table each in BENCHMARKS.md):

| workload   | what one step runs                                                                                     |
|------------|--------------------------------------------------------------------------------------------------------|
| `sft`      | policy train step, SFT loss (`training.forward.sft_forward`): forward, backward, AdamW step            |
| `rl`       | policy train step, clipped policy loss with the `grpo` preset (`training.forward.policy_forward`)      |
| `disc`     | discriminator train step, alignment loss (`training.forward.discriminator_forward`) on Qwen3-VL-MoE    |
| `logprobs` | log-prob recomputation: a forward without gradients giving log p of every target token                |
| `align-d`  | the alignment stage's D phase (`stages.align.discriminator_phase`: micro-batches, one D step whose      |
|            | forward also scores the rollouts), embedded default, before/after one vision encoding per image per step|
| `align-step` | `align-d`, then the advantage and the policy step (`stages.align.policy_phase`); likewise            |

A step is `--microbatches` micro-batches (default 4 on GPU, 2 on CPU), each one packed row of 4,096 tokens holding
several sequences, each with one image; the training workloads end with one optimizer step.
Policy micro-batch: sequences of 1,536 / 1,024 / 896 / 640 tokens with images of 28x28 / 24x32 / 20x20 / 16x16 patches
(196 / 192 / 100 / 64 image tokens); the second half of each sequence is the trained response. Discriminator
micro-batch: one prompt's 3 student captions (384 tokens) and CoTs (640), then its teacher caption and CoT, each
segment with the prompt's 16x16-patch image. The tiny (CPU) workloads have the same structure at 72 / 128 tokens.

Models have random weights and the published shapes; a truncated shape keeps the published widths and fewer
language layers, chosen so that our training state (about 18 bytes a parameter: bf16 weights, fp32 gradients, fp32
master weights and two AdamW moments) plus activations should fit one 80 GB GPU (not yet checked on one):

| shape  | language model                                                        | vision tower                     |
|--------|-----------------------------------------------------------------------|----------------------------------|
| `2b`   | Qwen3-VL-2B: hidden 2048, ffn 6144, 16/8 heads, 28 of 28 layers       | 24 blocks, hidden 1024, ffn 4096 |
| `4b`   | Qwen3-VL-4B: hidden 2560, ffn 9728, 32/8 heads, 16 of 36 layers       | 24 blocks, hidden 1024, ffn 4096 |
| `8b`   | Qwen3-VL-8B: hidden 4096, ffn 12288, 32/8 heads, 8 of 36 layers       | 27 blocks, hidden 1152, ffn 4304 |
| D `2b` | Qwen3-VL-2B upcycled to 4 experts, top-2 (PRISM_SPEC §2.1), 14 of 28  | as 2B                            |
| `tiny` | hidden 64, ffn 128, 4/2 heads, 4 layers, vocab 256 (CPU)              | 2 blocks, hidden 32              |

The Qwen3-VL shapes have head_dim 128 and a 151,936-token vocabulary (2B/4B with tied embeddings, 8B without); all
have 16-pixel patches merged 2x2. The discriminator runs at the 2B shape only, which is PRISM's D; `--layers N`
overrides the language layers of every shape chosen.

Implementations and variants. Ours is the production path: `models.build_policy` / `build_discriminator` (attention
backend `auto`: Transformer Engine when installed, else torch SDPA; bf16 on GPU, fp32 on CPU), Megatron DDP and
optimizer through `training.step`, the loss and log-prob code of `training/`. Variants, one factor at a time from
`packed`: `padded` (every sequence right-padded to the longest of its micro-batch, pads masked out of the loss; the
model then computes the padding as a padded batch does, while attention still takes the packed layout), `recompute`
(`model.recompute_activations`: full recomputation, one layer at a time) and `fp8-delayed` / `fp8-current`
(`model.fp8`, needs transformer-engine; otherwise recorded as not measured with the reason). transformers:
`Qwen3VLForConditionalGeneration` / `Qwen3VLMoeForConditionalGeneration` in bf16 on GPU (fp32 on CPU),
`torch.optim.AdamW` (fused on CUDA) on its parameters (no fp32 master weights, so its optimizer step is cheaper than
ours), gradient clipping at 1.0, losses computed from fp32 log-softmax of its logits (the discriminator: a Dropout +
Linear(H, 1) value head on the backbone's last hidden states). Each variant gets transformers' best path for it:
`padded`, a right-padded batch with an attention mask on SDPA; `packed`, the same packed row with per-sequence
position ids on flash-attn's variable-length kernel (`attn_implementation="flash_attention_2"`), measured only where
flash-attn is installed: transformers' SDPA path would turn a packed row into a dense [T x T] block mask, a cost no
packed trainer pays. Without flash-attn the run notes it, and our packed rows are compared with transformers' padded
rows. Both see the same sequences, images and trained tokens as ours.

Metrics, per row:
- step ms: median wall time of `--steps` steps after `--warmup` steps (CUDA synchronised around each step);
- tokens/s per GPU: real tokens per step (padding excluded) / step time; one process on one device;
- model TFLOP/s and MFU: model FLOPs per step / step time, and that over the device's dense bf16 peak
  (H100 SXM and H200: 989 TFLOP/s; `--peak-tflops` for others; no MFU on CPU);
- peak MiB: `torch.cuda.max_memory_allocated` during the timed steps (CPU: the process's peak resident set);
- vs transformers: our tokens/s over transformers' tokens/s on the same workload with the same packing.

Model FLOPs (`model_flops`), counted over real tokens only; recomputation, padding, norms, rotary, softmax,
activations, routing softmax, embedding lookups, losses and the optimizer are not counted. With, for the language
model, hidden h, layers L, query heads n_q, key-value heads n_kv, head dim d, FFN width f (MoE: E experts of width
f_e, top-k), and V outputs of the last layer (vocabulary 151,936 for the policy's log-probs, 1 for D's value head);
for the vision tower, hidden h_v, blocks L_v, FFN f_v, input patch size C*T_p*P^2 = 3*2*16^2 = 1536, merged tokens
of m^2 = 4 patches each, n_ds deepstack mergers, output width o = h:

    N_text   = L * (h*d*(2*n_q + 2*n_kv) + 3*h*f) + h*V        dense; MoE: 3*h*f -> 3*k*h*f_e + h*E
    N_patch  = 1536*h_v + L_v * (4*h_v^2 + 2*h_v*f_v)
    N_merged = (1 + n_ds) * (16*h_v^2 + 4*h_v*o)
    forward  = 2 * (tokens * N_text + patches * N_patch + merged tokens * N_merged)      matmuls, 2 FLOPs per MAC
             + 4 * L * n_q * d * sum_i s_i*(s_i + 1)/2     causal attention (QK^T and AV) within each sequence s_i
             + 4 * L_v * h_v * sum_j p_j^2                  bidirectional attention within each image of p_j patches
    training = 3 * forward (backward = 2 x forward); for the language model that is the usual
               6 * N_text * tokens + 12 * L * n_q * d * sum_i s_i*(s_i + 1)/2
    log-prob recomputation = forward

The alignment workloads (`align-d`, `align-step`) run the stage's own functions on the embedded default (tiny
Qwen3-VL policy and MoE discriminator; `--align-policy` / `--align-discriminator` take trained exports) on one
step's rollouts at each `--align-n` (`--align-prompts` prompts, generated once and untimed). "Before" is the same
code with `training.step`'s per-step image cache replaced by one that keeps nothing (`image_encoding`), which is
main@7713376's path: every micro-batch encodes its own images. Before and after alternate step by step. Rows give
the median wall time of each, their ratio, and per prompt of one step: vision-tower images in D and in the policy
(before, after; the reference trainer encodes 6n in D and 2n in the policy), D's packed sequences (reference 6n:
2n scored, then 4n in the update) and tokens (reference: the same segments, 2 student + 1 teacher pass per sample).

Targets for the GPU run: MFU >= 40 % for the 2B policy step on one H100, and >= 1.5x transformers' tokens/s.
On CPU every number is labelled CPU: the tiny shapes only show that the harness works, not how fast anything is.
The Triton kernels have their own benchmark, `tools/bench_kernels.py`, whose table closes BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import logging
import math
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch

WORKLOADS = ("sft", "rl", "disc", "logprobs")
ALIGN_WORKLOADS = ("align-d", "align-step")  # on the embedded default, before/after (not in the default run)
OUR_VARIANTS = ("packed", "padded", "recompute", "fp8-delayed", "fp8-current")
HF_VARIANTS = ("packed", "padded")
LR = 1e-6  # small enough that random-weight models stay finite over a few steps

# Dense bf16 peak (TFLOP/s) by device name, most specific first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
)


# --------------------------------------------------------------------------------------------------------------------
# Shapes, workloads and model FLOPs
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenIds:
    image: int
    video: int
    vision_start: int
    vision_end: int
    pad: int
    text_high: int  # random text ids are drawn from [3, text_high)


QWEN_IDS = TokenIds(image=151655, video=151656, vision_start=151652, vision_end=151653, pad=151643, text_high=151643)
TINY_IDS = TokenIds(image=252, video=253, vision_start=250, vision_end=251, pad=0, text_high=250)


@dataclass(frozen=True)
class ModelShape:
    """A Qwen3-VL (or, with experts, Qwen3-VL-MoE) architecture; `layers` may truncate `published_layers`."""

    name: str
    hidden: int
    layers: int
    published_layers: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool
    vision_depth: int
    vision_hidden: int
    vision_ffn: int
    vision_heads: int
    deepstack: tuple[int, ...]
    ids: TokenIds = QWEN_IDS
    mrope: tuple[int, int, int] = (24, 20, 20)  # rotary pairs of a head given to (t, h, w) positions
    experts: int = 0  # 0: dense
    top_k: int = 0
    patch: int = 16
    temporal_patch: int = 2
    merge: int = 2
    in_channels: int = 3

    @property
    def label(self) -> str:
        kind = f"-MoE {self.experts}x top-{self.top_k}" if self.experts else ""
        return f"{self.name}{kind} ({self.layers}/{self.published_layers} layers)"

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch * self.patch**2


_QWEN3_VL_2B = ModelShape(
    name="2B", hidden=2048, layers=28, published_layers=28, ffn=6144, heads=16, kv_heads=8, head_dim=128,
    vocab=151936, tie_embeddings=True, vision_depth=24, vision_hidden=1024, vision_ffn=4096, vision_heads=16,
    deepstack=(5, 11, 17),
)  # fmt: skip
_TINY = ModelShape(
    name="tiny", hidden=64, layers=4, published_layers=4, ffn=128, heads=4, kv_heads=2, head_dim=16, vocab=256,
    tie_embeddings=False, vision_depth=2, vision_hidden=32, vision_ffn=64, vision_heads=2, deepstack=(0, 1),
    ids=TINY_IDS, mrope=(4, 2, 2),
)  # fmt: skip
_QWEN3_VL_4B = replace(_QWEN3_VL_2B, name="4B", hidden=2560, layers=16, published_layers=36, ffn=9728, heads=32)
_QWEN3_VL_8B = replace(
    _QWEN3_VL_2B, name="8B", hidden=4096, layers=8, published_layers=36, ffn=12288, heads=32, tie_embeddings=False,
    vision_depth=27, vision_hidden=1152, vision_ffn=4304, deepstack=(8, 16, 24),
)  # fmt: skip
POLICY_SHAPES = {"2b": _QWEN3_VL_2B, "4b": _QWEN3_VL_4B, "8b": _QWEN3_VL_8B, "tiny": _TINY}
# PRISM's discriminator: Qwen3-VL-2B upcycled to 4 experts, top-2, every layer sparse (PRISM_SPEC §2.1).
DISCRIMINATOR_SHAPES = {
    "2b": replace(_QWEN3_VL_2B, layers=14, experts=4, top_k=2),
    "tiny": replace(_TINY, experts=4, top_k=2),
}


@dataclass(frozen=True)
class Workload:
    """The sequences of one micro-batch: their lengths and, per sequence, one image's (t, h, w) patch grid."""

    lengths: tuple[int, ...]
    grids: tuple[tuple[int, int, int], ...]
    students: int = 0  # discriminator: student captions, student CoTs, then one teacher caption and CoT

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def _discriminator_workload(caption: int, cot: int, grid: tuple[int, int, int], students: int) -> Workload:
    lengths = (caption,) * students + (cot,) * students + (caption, cot)
    return Workload(lengths=lengths, grids=(grid,) * len(lengths), students=students)


POLICY_WORKLOAD = Workload(lengths=(1536, 1024, 896, 640), grids=((1, 28, 28), (1, 24, 32), (1, 20, 20), (1, 16, 16)))
DISCRIMINATOR_WORKLOAD = _discriminator_workload(384, 640, (1, 16, 16), students=3)
TINY_POLICY_WORKLOAD = Workload(lengths=(24, 16, 16, 16), grids=((1, 4, 8), (1, 4, 4), (1, 4, 4), (1, 4, 4)))
TINY_DISCRIMINATOR_WORKLOAD = _discriminator_workload(14, 18, (1, 4, 4), students=3)


def workload_for(shape_name: str, discriminator: bool) -> Workload:
    if shape_name == "tiny":
        return TINY_DISCRIMINATOR_WORKLOAD if discriminator else TINY_POLICY_WORKLOAD
    return DISCRIMINATOR_WORKLOAD if discriminator else POLICY_WORKLOAD


@dataclass(frozen=True)
class MatmulParams:
    """Weights that multiply each input once (MACs per item): N_text, N_patch and N_merged of the module docstring."""

    per_token: int  # language layers (active experts only) and the output layer
    per_patch: int  # patch embedding and vision blocks
    per_merged: int  # patch merger and deepstack mergers


def matmul_params(shape: ModelShape) -> MatmulParams:
    h, hv, merge_in = shape.hidden, shape.vision_hidden, shape.merge**2 * shape.vision_hidden
    mlp = 3 * shape.top_k * h * shape.ffn + h * shape.experts if shape.experts else 3 * h * shape.ffn
    outputs = 1 if shape.experts else shape.vocab  # the discriminator's value head, or the policy's vocabulary
    return MatmulParams(
        per_token=shape.layers * (h * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads) + mlp) + h * outputs,
        per_patch=shape.patch_dim * hv + shape.vision_depth * (4 * hv**2 + 2 * hv * shape.vision_ffn),
        per_merged=(1 + len(shape.deepstack)) * (merge_in * merge_in + merge_in * h),
    )


def model_flops(shape: ModelShape, workload: Workload, training: bool) -> float:
    """Model FLOPs of one micro-batch (the formula of the module docstring); `training`: forward and backward."""
    params, hv = matmul_params(shape), shape.vision_hidden
    per_token, per_patch, per_merged = params.per_token, params.per_patch, params.per_merged
    patches = [t * gh * gw for t, gh, gw in workload.grids]
    matmuls = 2 * (workload.tokens * per_token + sum(patches) * per_patch + sum(patches) // shape.merge**2 * per_merged)
    causal_pairs = sum(s * (s + 1) // 2 for s in workload.lengths)
    attention = 4 * shape.layers * shape.heads * shape.head_dim * causal_pairs
    vision_attention = 4 * shape.vision_depth * hv * sum(p * p for p in patches)
    return float((3 if training else 1) * (matmuls + attention + vision_attention))


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: `override`, else the table above; None on CPU or an unknown GPU."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


# --------------------------------------------------------------------------------------------------------------------
# Random-weight checkpoints and the sequences fed to both implementations
# --------------------------------------------------------------------------------------------------------------------


def hf_config(shape: ModelShape) -> Any:
    """The transformers config of `shape` (Qwen3VLConfig, or Qwen3VLMoeConfig when it has experts)."""
    from transformers import Qwen3VLConfig

    from prism_mcore.models.upcycle import moe_config_from_dense

    text = dict(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        max_position_embeddings=262144, rope_theta=5_000_000.0, tie_word_embeddings=shape.tie_embeddings,
        rope_scaling={"rope_type": "default", "mrope_section": list(shape.mrope), "mrope_interleaved": True},
        bos_token_id=shape.ids.pad, eos_token_id=shape.ids.pad,
    )  # fmt: skip
    vision = dict(
        depth=shape.vision_depth, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_ffn,
        num_heads=shape.vision_heads, patch_size=shape.patch, temporal_patch_size=shape.temporal_patch,
        spatial_merge_size=shape.merge, in_channels=shape.in_channels, out_hidden_size=shape.hidden,
        num_position_embeddings=2304, deepstack_visual_indexes=list(shape.deepstack),
    )  # fmt: skip
    dense = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=shape.ids.image, video_token_id=shape.ids.video,
        vision_start_token_id=shape.ids.vision_start, vision_end_token_id=shape.ids.vision_end,
        tie_word_embeddings=shape.tie_embeddings,
    )  # fmt: skip
    if not shape.experts:
        return dense
    return moe_config_from_dense(dense, num_experts=shape.experts, top_k=shape.top_k, aux_loss_coef=0.01)


def random_checkpoint(shape: ModelShape, folder: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight transformers model of `shape`, initialised on `device` and saved to `folder` in `dtype`."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    cls = Qwen3VLMoeForConditionalGeneration if shape.experts else Qwen3VLForConditionalGeneration
    with torch.device(device):
        model = cls._from_config(hf_config(shape), dtype=dtype, attn_implementation="sdpa")
    model.save_pretrained(folder)
    return model


def build_sequences(shape: ModelShape, workload: Workload, seed: int) -> list[Any]:
    """`TokenSequence`s of a micro-batch: [one prompt token, vision start, image tokens, vision end, prompt text,
    response], the response (the second half) trained; the last token is a discriminator segment's scored token."""
    from prism_mcore.data.samples import IGNORE_INDEX, TokenSequence, mrope_position_ids
    from prism_mcore.record import ImageInputs

    generator = torch.Generator().manual_seed(seed)
    ids = shape.ids
    sequences = []
    for length, grid in zip(workload.lengths, workload.grids, strict=True):
        image_tokens = grid[0] * grid[1] * grid[2] // shape.merge**2
        response = length // 2
        prompt_text = length - response - image_tokens - 3
        if prompt_text < 0:
            raise ValueError(f"a {length}-token sequence cannot hold a {image_tokens}-token image and its response")
        text = torch.randint(3, ids.text_high, (length,), generator=generator)
        input_ids = torch.cat([
            text[:1], torch.tensor([ids.vision_start]), torch.full((image_tokens,), ids.image),
            torch.tensor([ids.vision_end]), text[1 : 1 + prompt_text + response],
        ])  # fmt: skip
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[-response:] = input_ids[-response:]
        grid_thw = torch.tensor([grid])
        pixels = torch.randn(grid[0] * grid[1] * grid[2], shape.patch_dim, generator=generator)
        sequences.append(
            TokenSequence(
                input_ids=input_ids,
                position_ids=mrope_position_ids(input_ids, grid_thw, ids.image, shape.merge),
                labels=labels,
                image_inputs=ImageInputs(pixels, grid_thw),
                score_index=length - 1,
            )
        )
    return sequences


def pad_to_longest(sequences: Sequence[Any], pad_id: int) -> list[Any]:
    """Each sequence right-padded to the longest one with untrained pad tokens (positions continue after the end)."""
    from prism_mcore.data.samples import IGNORE_INDEX

    longest = max(len(sequence) for sequence in sequences)
    padded = []
    for sequence in sequences:
        extra = longest - len(sequence)
        positions = sequence.position_ids[:, -1:] + torch.arange(1, extra + 1)
        padded.append(
            replace(
                sequence,
                input_ids=torch.cat([sequence.input_ids, torch.full((extra,), pad_id)]),
                position_ids=torch.cat([sequence.position_ids, positions], dim=1),
                labels=torch.cat([sequence.labels, torch.full((extra,), IGNORE_INDEX)]),
            )
        )
    return padded


@dataclass
class RightPadded:
    """Sequences right-padded to the longest one, for transformers' padded forward (the trainer only packs)."""

    input_ids: torch.Tensor  # [B, L], the pad id after each sequence
    attention_mask: torch.Tensor  # [B, L], 1 on real tokens
    position_ids: torch.Tensor  # [3, B, L], 0 on padding
    labels: torch.Tensor  # [B, L], IGNORE_INDEX on padding and where no loss applies
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    score_indices: torch.Tensor | None  # [B]: each row's scored token


def right_padded(sequences: Sequence[Any], pad_id: int) -> RightPadded:
    """`sequences` as one right-padded batch with an attention mask, images concatenated in order."""
    from prism_mcore.data.samples import IGNORE_INDEX

    rows, longest = len(sequences), max(len(sequence) for sequence in sequences)
    batch = RightPadded(
        input_ids=torch.full((rows, longest), pad_id, dtype=torch.long),
        attention_mask=torch.zeros(rows, longest, dtype=torch.long),
        position_ids=torch.zeros(3, rows, longest, dtype=torch.long),
        labels=torch.full((rows, longest), IGNORE_INDEX, dtype=torch.long),
        pixel_values=None,
        image_grid_thw=None,
        score_indices=None,
    )
    for row, sequence in enumerate(sequences):
        size = len(sequence)
        batch.input_ids[row, :size] = sequence.input_ids
        batch.attention_mask[row, :size] = 1
        batch.position_ids[:, row, :size] = sequence.position_ids
        if sequence.labels is not None:
            batch.labels[row, :size] = sequence.labels
    images = [sequence.image_inputs for sequence in sequences if sequence.image_inputs is not None]
    if images:
        batch.pixel_values = torch.cat([image.pixel_values for image in images])
        batch.image_grid_thw = torch.cat([image.image_grid_thw for image in images])
    if all(sequence.score_index is not None for sequence in sequences):
        batch.score_indices = torch.tensor([sequence.score_index for sequence in sequences])
    return batch


def advantages_for(count: int, seed: int) -> list[float]:
    """One advantage per sequence, N(0, 1), as group-normalised advantages are distributed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, generator=generator).tolist()


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor, also inside (nested) dataclasses and dicts, moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: to_device(getattr(value, f.name), device) for f in fields(value) if f.init})
    return value


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measurement."""

    workload: str
    shape: str
    implementation: str  # "prism_mcore" or "transformers"
    variant: str  # packed, padded, recompute, fp8-delayed, fp8-current
    setup: str  # backend, precision and the variant's settings, as run
    device: str
    tokens_per_step: int  # real tokens, padding excluded
    step_ms: float | None = None
    tokens_per_s: float | None = None
    model_tflops: float | None = None
    mfu: float | None = None  # fraction of the peak; None without a stated peak (CPU)
    peak_mib: float | None = None
    vs_transformers: float | None = None
    note: str = ""

    @property
    def packing(self) -> str:
        return "padded" if self.variant == "padded" else "packed"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads > 1 else ''})"


def measure(step: Callable[[], object], warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(median seconds per step, peak memory in MiB) of `step` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    return statistics.median(times), peak


@dataclass
class Bench:
    """Run-wide settings and the rows measured so far."""

    device: torch.device
    microbatches: int
    warmup: int
    steps: int
    peak_tflops: float | None
    rows: list[Row] = field(default_factory=list)
    notes: dict[str, None] = field(default_factory=dict)  # what was not measured and why, in order, once each

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes[text] = None
            print(text, flush=True)

    def record(
        self,
        step: Callable[[], object],
        workload: str,
        shape: ModelShape,
        plan: Workload,
        implementation: str,
        variant: str,
        setup: str,
    ) -> None:
        tokens = plan.tokens * self.microbatches
        row = Row(workload, shape.label, implementation, variant, setup, device_label(self.device), tokens)
        try:
            seconds, row.peak_mib = measure(step, self.warmup, self.steps, self.device)
        except torch.OutOfMemoryError:
            row.note = "out of memory"
            free_memory()
        except Exception as error:  # one failing variant must not lose the rest of a long GPU run
            traceback.print_exc()
            row.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            free_memory()
        else:
            flops = model_flops(shape, plan, training=workload != "logprobs") * self.microbatches
            row.step_ms = 1e3 * seconds
            row.tokens_per_s = tokens / seconds
            row.model_tflops = flops / seconds / 1e12
            row.mfu = row.model_tflops / self.peak_tflops if self.peak_tflops else None
        self.rows.append(row)
        print(format_row(row, run="-"), flush=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# prism_mcore
# --------------------------------------------------------------------------------------------------------------------


def our_microbatches(shape: ModelShape, workload: str, plan: Workload, count: int, padded: bool) -> list[Any]:
    """The micro-batches the training forward steps take (`TokenBatch`, or `DiscriminatorBatch` for `disc`)."""
    from prism_mcore.data.batching import pack_sequences
    from prism_mcore.training.forward import DiscriminatorBatch, token_batch

    batches = []
    for index in range(count):
        sequences = build_sequences(shape, plan, seed=index)
        packed = pack_sequences(pad_to_longest(sequences, shape.ids.pad) if padded else sequences)
        if workload == "disc":
            m = plan.students
            batches.append(
                DiscriminatorBatch(
                    packed=packed,
                    valid=torch.ones(m, dtype=torch.bool),
                    teacher_index=torch.zeros(m, dtype=torch.long),
                    num_prompts=1,
                    num_valid_global=m * count,
                )
            )
        else:
            advantages = advantages_for(len(sequences), seed=index) if workload == "rl" else None
            batches.append(token_batch(packed, advantages))
    return batches


def our_step(
    workload: str, models: list[torch.nn.Module], optimizer: Any, scheduler: Any, batches: list[Any]
) -> Callable[[], object]:
    from prism_mcore.algorithms import DiscriminatorLossConfig, policy_loss_preset
    from prism_mcore.training.forward import discriminator_forward, policy_forward, sft_forward
    from prism_mcore.training.step import forward_only, train_step

    if workload == "logprobs":
        # The SFT forward step under no_grad is exactly a log-prob pass; its masked sum is negligible.
        return lambda: forward_only(models, sft_forward, batches)
    forward_step = {
        "sft": sft_forward,
        "rl": policy_forward(policy_loss_preset("grpo")),
        "disc": discriminator_forward(DiscriminatorLossConfig()),
    }[workload]

    def step() -> None:
        result = train_step(models, optimizer, scheduler, forward_step, batches)
        if result.skipped:  # a skipped update is a shorter step: it must not be timed as a real one
            raise RuntimeError(f"the update was skipped (gradient norm {result.grad_norm})")

    return step


def run_ours(
    bench: Bench,
    folder: Path,
    shape: ModelShape,
    plan: Workload,
    workloads: list[str],
    variants: list[str],
    backend: str,
) -> None:
    """Build our model once per setting (plain, recompute, each FP8 recipe) and run the workloads' variants on it."""
    from prism_mcore.config.schema import ModelConfig, OptimConfig, ParallelConfig
    from prism_mcore.models import build_discriminator, build_policy
    from prism_mcore.models.backend import fp8_settings, resolve_backend
    from prism_mcore.models.qwen3_vl import resolve_dtype
    from prism_mcore.training.step import build_optimizer, wrap_ddp

    # One model build per setting, and the variants measured on it.
    settings = [("plain", [v for v in ("packed", "padded") if v in variants])]
    settings += [(v, [v]) for v in ("recompute", "fp8-delayed", "fp8-current") if v in variants]
    resolved = resolve_backend(backend)
    for setting, setting_variants in settings:
        if not setting_variants:
            continue
        config = ModelConfig(
            attention_backend=backend,
            recompute_activations=setting == "recompute",
            fp8=setting.removeprefix("fp8-") if setting.startswith("fp8") else "none",
        )
        try:
            fp8_settings(config.fp8, resolved)
        except ValueError as refusal:
            bench.note(f"{setting} not measured: {refusal}")
            continue
        build = build_discriminator if shape.experts else build_policy
        handle = build(config, ParallelConfig(), path=folder)
        use_distributed = bench.device.type == "cuda"
        models = wrap_ddp(handle.chunks, use_distributed_optimizer=use_distributed)
        optimizer, scheduler = build_optimizer(
            models, OptimConfig(lr=LR), bench.warmup + bench.steps, use_distributed, bf16=bool(handle.config.bf16)
        )
        dtype = str(resolve_dtype(config.dtype)).removeprefix("torch.")
        for workload in workloads:
            # Recomputation only changes a backward pass; the log-prob pass has none.
            for variant in setting_variants if not (workload == "logprobs" and setting == "recompute") else []:
                padded = variant == "padded"
                batches = to_device(our_microbatches(shape, workload, plan, bench.microbatches, padded), bench.device)
                setup = (
                    f"{'padded' if padded else 'packed'} · {resolved} · {dtype} · "
                    f"recompute {'on' if config.recompute_activations else 'off'} · fp8 {config.fp8}"
                )
                bench.record(
                    our_step(workload, models, optimizer, scheduler, batches),
                    workload,
                    shape,
                    plan,
                    "prism_mcore",
                    variant,
                    setup,
                )
        del handle, models, optimizer, scheduler
        free_memory()


# --------------------------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class HFBatch:
    """A transformers micro-batch: forward inputs and the per-token targets in the same `[rows, length]` layout."""

    inputs: dict[str, Any]
    targets: torch.Tensor  # next token of the same sequence
    loss_mask: torch.Tensor  # bool: trained positions
    advantages: torch.Tensor
    score_rows: torch.Tensor  # each sequence's scored token: its row and column
    score_columns: torch.Tensor
    cu_seqlens: torch.Tensor | None  # packed: the sequence boundaries within the one row


def hf_microbatches(shape: ModelShape, workload: str, plan: Workload, count: int, padded: bool) -> list[HFBatch]:
    """The same sequences as `our_microbatches`, packed (one row, position resets) or right-padded for transformers."""
    from prism_mcore.data.batching import pack_sequences
    from prism_mcore.data.samples import IGNORE_INDEX
    from prism_mcore.training.forward import token_batch

    batches = []
    for index in range(count):
        sequences = build_sequences(shape, plan, seed=index)
        advantages = advantages_for(len(sequences), seed=index)
        if padded:
            batch = right_padded(sequences, shape.ids.pad)
            targets = torch.zeros_like(batch.input_ids)
            targets[:, :-1] = batch.input_ids[:, 1:]
            next_labels = torch.full_like(batch.labels, IGNORE_INDEX)
            next_labels[:, :-1] = batch.labels[:, 1:]
            loss_mask = next_labels != IGNORE_INDEX
            inputs = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
            rows, columns = torch.arange(len(sequences)), batch.score_indices
            per_token_advantages = torch.tensor(advantages)[:, None] * loss_mask
            cu_seqlens = None
        else:
            batch = pack_sequences(sequences)
            tokens = token_batch(batch, advantages)
            targets, loss_mask, per_token_advantages = tokens.targets, tokens.loss_mask, tokens.advantages
            inputs = {"position_ids": batch.hf_position_ids()}  # a position reset marks each sequence start
            rows, columns = torch.zeros(len(sequences), dtype=torch.long), batch.score_indices
            cu_seqlens = batch.cu_seqlens
        inputs.update(
            input_ids=batch.input_ids,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            mm_token_type_ids=(batch.input_ids == shape.ids.image).long(),
            use_cache=False,
        )
        batches.append(HFBatch(inputs, targets, loss_mask, per_token_advantages, rows, columns, cu_seqlens))
    return batches


def hf_logprobs(model: torch.nn.Module, batch: HFBatch) -> torch.Tensor:
    """log p of each target token from transformers' logits, in fp32 (the usual transformers-based recipe)."""
    logits = model(**batch.inputs).logits
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)


def hf_rows(values: torch.Tensor, batch: HFBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`[n, L]` per-sequence rows of the trained positions (and their mask), as the policy loss takes them."""
    from prism_mcore.training.forward import sequence_rows

    if batch.cu_seqlens is None:
        return values, batch.loss_mask
    rows, mask = sequence_rows(values, batch.loss_mask, batch.cu_seqlens)
    return rows, mask.to(rows.device)


def hf_loss(
    workload: str, model: torch.nn.Module, head: torch.nn.Module | None, batch: HFBatch, plan: Workload, count: int
) -> torch.Tensor:
    """The micro-batch's loss, scaled so that the gradients of `count` micro-batches add up to the step's."""
    from prism_mcore.algorithms import DiscriminatorLossConfig, discriminator_loss, policy_loss, policy_loss_preset

    if workload == "disc":
        hidden = model.model(**batch.inputs).last_hidden_state
        scores = head(hidden)[..., 0][batch.score_rows, batch.score_columns].float()
        m = plan.students
        teacher = torch.zeros(m, dtype=torch.long, device=scores.device)
        result = discriminator_loss(
            scores[:m], scores[m : 2 * m], scores[2 * m : 2 * m + 1][teacher], scores[2 * m + 1 :][teacher],
            torch.ones(m, dtype=torch.bool, device=scores.device), num_valid_global=m * count,
            config=DiscriminatorLossConfig(),
        )  # fmt: skip
        return result.loss / count
    logprobs = hf_logprobs(model, batch)
    if workload == "sft":
        mask = batch.loss_mask.float()
        return -(logprobs * mask).sum() / (mask.sum() * count)
    log_probs, mask = hf_rows(logprobs, batch)
    advantages, _ = hf_rows(batch.advantages, batch)
    return policy_loss(log_probs, log_probs.detach(), advantages, mask, policy_loss_preset("grpo")).loss / count


def hf_step(
    workload: str,
    model: torch.nn.Module,
    head: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    batches: list[HFBatch],
    plan: Workload,
) -> Callable[[], object]:
    if workload == "logprobs":

        def recompute() -> None:
            with torch.no_grad():
                for batch in batches:
                    hf_logprobs(model, batch)

        return recompute
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def train() -> None:
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            hf_loss(workload, model, head, batch, plan, len(batches)).backward()
        norm = torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        if not torch.isfinite(norm):
            raise RuntimeError(f"non-finite gradient norm {norm.item()}")
        optimizer.step()

    return train


def flash_varlen_available(device: torch.device) -> bool:
    """Whether transformers can run packed rows through flash-attn's variable-length kernel here."""
    import importlib.util

    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def run_transformers(
    bench: Bench, model: torch.nn.Module, shape: ModelShape, plan: Workload, workloads: list[str], variants: list[str]
) -> None:
    """The workloads on the transformers model (trained in place: its random weights move by a few tiny steps)."""
    dtype = next(model.parameters()).dtype
    model.train()
    head = None
    if shape.experts:  # PRISM's value head: Dropout(0.1) -> Linear(H, 1, bias=False), N(0, 0.02^2)
        head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(shape.hidden, 1, bias=False))
        torch.nn.init.normal_(head[1].weight, std=0.02)
        head = head.to(bench.device, dtype)
    parameters = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    optimizer = torch.optim.AdamW(
        parameters, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, fused=bench.device.type == "cuda"
    )
    precision = str(dtype).removeprefix("torch.")
    varlen = flash_varlen_available(bench.device)
    if "packed" in variants and not varlen:
        bench.note(
            "transformers packed not measured: without flash-attn's variable-length kernel its SDPA path turns a "
            "packed row into a dense [T x T] block mask; our packed rows are compared with its padded SDPA rows"
        )
    for workload in workloads:
        for variant in variants:
            padded = variant == "padded"
            if not padded and not varlen:
                continue
            attention = "sdpa" if padded else "flash_attention_2"
            model.set_attn_implementation(attention)
            batches = to_device(hf_microbatches(shape, workload, plan, bench.microbatches, padded), bench.device)
            layout = "padded + attention mask" if padded else "packed (flash-attn varlen: position resets)"
            setup = f"{layout} · {attention} · {precision}" + ("" if workload == "logprobs" else " · torch AdamW")
            step = hf_step(workload, model, head, optimizer, batches, plan)
            bench.record(step, workload, shape, plan, "transformers", variant, setup)
    model.set_attn_implementation("sdpa")
    del optimizer, head
    free_memory()


# --------------------------------------------------------------------------------------------------------------------
# Alignment phases on the embedded default, before/after issue 13's per-step image encoding
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class AlignRow:
    """One alignment workload at one n: wall time with images encoded once per step ("after", this code) and once
    per micro-batch ("before", main@7713376's path), and the work per prompt of one step."""

    workload: str  # align-d or align-step
    n: int
    prompts: int
    device: str
    before_ms: float
    after_ms: float
    d_images_before: float  # per prompt: vision-tower images in D's step
    d_images_after: float
    policy_images_before: float  # per prompt: vision-tower images in the policy's step
    policy_images_after: float
    d_sequences: float  # per prompt: D's packed sequences (scoring and update are one forward)
    d_tokens: float
    reference_d_tokens: float  # per prompt: the reference's 2n scoring + 4n update segments, same lengths

    @property
    def ratio(self) -> float:
        return self.after_ms / self.before_ms


class _NoStepImages:
    """A step image cache that keeps nothing: every micro-batch encodes its own images (main@7713376's path)."""

    encoded_images = 0

    def backward(self) -> None:
        pass

    def clear(self) -> None:
        pass


@contextmanager
def _per_microbatch_images(models: Sequence[torch.nn.Module]) -> Iterator[_NoStepImages]:
    yield _NoStepImages()


@contextmanager
def image_encoding(before: bool) -> Iterator[None]:
    """Inside the block, `training.step` encodes images once per micro-batch when `before`, else once per step (the
    code as it is): the "before" side of the alignment workloads, in the same process as the "after" side."""
    import prism_mcore.training.step as step_module

    saved = step_module.step_images
    if before:
        step_module.step_images = _per_microbatch_images
    try:
        yield
    finally:
        step_module.step_images = saved


def run_alignment(
    workloads: list[str],
    ns: list[int],
    prompts_per_step: int,
    warmup: int,
    steps: int,
    work_dir: Path,
    checkpoints: tuple[str, str] = ("", ""),
) -> list[AlignRow]:
    """`align-d` (D's scoring + update phase: micro-batches, one D step whose forward also scores, scores shared)
    and `align-step` (that, then the advantage and the policy step) of `stages.align` on the embedded default, on
    the rollouts of one step at each n (generated once, untimed: rollout and weight sync are outside the timed
    phases). Before and after alternate step by step, so that load on a shared machine hits both alike.
    `checkpoints`: the policy's and D's HF folders (empty: the embedded default's), e.g. an SFT and warmup export,
    whose responses have the caption/CoT format."""
    from prism_mcore.algorithms import AlignmentAdvantageConfig, DiscriminatorLossConfig
    from prism_mcore.config.recipes import load_recipe
    from prism_mcore.data.batching import batch_for_step, step_image_count
    from prism_mcore.models import build_discriminator, build_policy
    from prism_mcore.rollout import SamplingParams
    from prism_mcore.stages.align import discriminator_phase, policy_phase
    from prism_mcore.stages.context import load_prompts, setup
    from prism_mcore.stages.rollouts import rollout, rollout_engine
    from prism_mcore.training.forward import policy_forward
    from prism_mcore.training.loop import make_trainable
    from prism_mcore.training.loss_config import policy_loss_config
    from prism_mcore.training.sharding import token_budget

    config = load_recipe("embedded")
    config.run.output_dir = str(work_dir / "align-run")
    config.run.tensorboard = False
    config.model.policy_path, config.model.discriminator_path = checkpoints
    ctx = setup(config)
    cfg = config.align
    prompts = load_prompts(ctx, config.data.align_path, "align", require_teacher=True)
    policy = make_trainable(build_policy(config.model, config.parallel), cfg.policy_optim, 100, config.parallel)
    discriminator = make_trainable(
        build_discriminator(config.model, config.parallel, seed=config.run.seed),
        cfg.discriminator_optim,
        100,
        config.parallel,
    )
    budget = token_budget(config.data, cfg.max_tokens_per_microbatch)
    d_loss = DiscriminatorLossConfig(score_clip=cfg.score_clip, score_reg_coef=cfg.score_reg_coef)
    advantage_config = AlignmentAdvantageConfig(
        mode=cfg.advantage_mode,
        caption_weight=cfg.caption_weight,
        cot_weight=cfg.cot_weight,
        format_penalty=cfg.format_penalty,
    )
    policy_step = policy_forward(
        policy_loss_config(cfg.policy_loss, config.rollout.tis_cap), config.rollout.temperature
    )
    rows = []
    step_prompts = batch_for_step(prompts, 0, prompts_per_step, config.run.seed)
    rollouts = {}
    with rollout_engine(ctx, config.model.policy_path) as engine:
        for n in ns:
            params = SamplingParams.from_config(config.rollout, seed=config.run.seed)
            rollouts[n] = rollout(ctx, engine, step_prompts, replace(params, n=n, max_new_tokens=cfg.max_new_tokens))
    for n, samples in rollouts.items():
        for workload in workloads:
            times: dict[bool, list[float]] = {True: [], False: []}
            for index in range(warmup + steps):
                for before in (True, False):
                    with image_encoding(before):
                        began = time.perf_counter()
                        d_batches, _ = discriminator_phase(ctx.builder, ctx.env, discriminator, samples, budget, d_loss)
                        p_batches = []
                        if workload == "align-step":
                            _, p_batches, _ = policy_phase(
                                ctx.builder, ctx.env, policy, policy_step, samples, advantage_config, budget
                            )
                        if index >= warmup:
                            times[before].append(time.perf_counter() - began)
            d_packed = [b.packed for b in d_batches]
            p_packed = [b.packed for b in p_batches]
            teacher_tokens = {s.uid: sum(len(t) for t in ctx.builder.teacher_segments(s)) for s in samples}
            reference_tokens = sum(
                2 * sum(len(t) for t in ctx.builder.student_segments(s)) + teacher_tokens[s.uid] for s in samples
            )
            per_prompt = 1 / prompts_per_step
            rows.append(
                AlignRow(
                    workload=workload,
                    n=n,
                    prompts=prompts_per_step,
                    device=device_label(ctx.env.device),
                    before_ms=1e3 * statistics.median(times[True]),
                    after_ms=1e3 * statistics.median(times[False]),
                    d_images_before=per_prompt * sum(b.num_images for b in d_packed),
                    d_images_after=per_prompt * step_image_count(d_packed),
                    policy_images_before=per_prompt * sum(b.num_images for b in p_packed),
                    policy_images_after=per_prompt * step_image_count(p_packed),
                    d_sequences=per_prompt * sum(b.num_sequences for b in d_packed),
                    d_tokens=per_prompt * sum(b.num_tokens for b in d_packed),
                    reference_d_tokens=per_prompt * reference_tokens,
                )
            )
            print(format_align_row(rows[-1], run="-"), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Output: BENCHMARKS.md tables and a JSON file
# --------------------------------------------------------------------------------------------------------------------

TITLES = {
    "sft": "Policy train step, SFT loss (`sft`)",
    "rl": "Policy train step, RL policy loss, GRPO preset (`rl`)",
    "disc": "Discriminator train step, alignment loss (`disc`)",
    "logprobs": "Log-prob recomputation, forward only (`logprobs`)",
}
RUNS_HEADER = "| run | date | device | versions | command | notes |\n|---|---|---|---|---|---|"
ROWS_HEADER = (
    "| run | shape | implementation | variant | setup | tokens/step | step ms | tokens/s/GPU | model TFLOP/s | MFU "
    "| peak MiB | vs transformers |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


ALIGN_TITLE = "Alignment phases on the embedded default, before/after one vision encoding per image per step"
ALIGN_HEADER = (
    "| run | workload | n | prompts | device | before ms | after ms | after/before | D images/prompt before, after "
    "(reference 6n) | policy images/prompt before, after (reference 2n) | D sequences/prompt (reference 6n) "
    "| D tokens/prompt (reference) |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_align_row(row: AlignRow, run: int | str) -> str:
    return (
        f"| {run} | {row.workload} | {row.n} | {row.prompts} | {row.device} | {row.before_ms:,.0f} "
        f"| {row.after_ms:,.0f} | {row.ratio:.2f} | {row.d_images_before:g}, {row.d_images_after:g} ({6 * row.n}) "
        f"| {row.policy_images_before:g}, {row.policy_images_after:g} ({2 * row.n}) "
        f"| {row.d_sequences:g} ({6 * row.n}) | {row.d_tokens:,.0f} ({row.reference_d_tokens:,.0f}) |"
    )


def _marker(name: str) -> str:
    return f"<!-- benchmark:{name} -->"


def skeleton() -> str:
    """The sections `append_results` fills: the runs table, then one table per workload."""
    parts = [f"## Runs\n\n{_marker('runs')}\n{RUNS_HEADER}\n"]
    for workload, title in TITLES.items():
        parts.append(f"## {title}\n\n{_marker(workload)}\n{ROWS_HEADER}\n")
    parts.append(_align_section())
    return "\n".join(parts)


def _align_section() -> str:
    return f"## {ALIGN_TITLE}\n\n{_marker('align')}\n{ALIGN_HEADER}\n"


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def format_row(row: Row, run: int | str) -> str:
    mfu = "n/a" if row.mfu is None else f"{100 * row.mfu:.1f} %"
    ratio = "n/a" if row.vs_transformers is None else f"{row.vs_transformers:.2f}x"
    step = row.note or _number(row.step_ms, 1)
    run = f"{run} (CPU)" if row.device.startswith("CPU") else run
    return (
        f"| {run} | {row.shape} | {row.implementation} | {row.variant} | {row.setup} | {row.tokens_per_step:,} "
        f"| {step} | {_number(row.tokens_per_s, 0)} | {_number(row.model_tflops, 4 if row.device.startswith('CPU') else 1)} "
        f"| {mfu} | {_number(row.peak_mib, 0)} | {ratio} |"
    )


def _insert_after_table(lines: list[str], marker: str, new_lines: list[str]) -> None:
    start = lines.index(marker) + 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[end:end] = new_lines


def append_results(path: Path, rows: list[Row], run_row: dict[str, str], align_rows: Sequence[AlignRow] = ()) -> int:
    """Add this run to the runs table and its rows to each workload's table of `path`; returns the run number.

    The tables are found by their HTML-comment markers; a file without them gets the skeleton at its top, so that
    `tools/bench_kernels.py`, which appends at the end of the file, keeps its table last.
    """
    text = path.read_text() if path.exists() else ""
    if _marker("runs") not in text:
        text = skeleton() + ("\n" + text if text else "")
    if align_rows and _marker("align") not in text:  # a file from before the alignment workloads
        text = text.replace(f"## {TITLES['logprobs']}", _align_section() + f"\n## {TITLES['logprobs']}", 1)
    lines = text.splitlines()
    start = lines.index(_marker("runs")) + 3  # past the header and separator lines
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    run = end - start + 1
    cells = [str(run), run_row["date"], run_row["device"], run_row["versions"], run_row["command"], run_row["notes"]]
    lines[end:end] = ["| " + " | ".join(cells) + " |"]
    for workload in TITLES:
        mine = [format_row(row, run) for row in rows if row.workload == workload]
        if mine:
            _insert_after_table(lines, _marker(workload), mine)
    if align_rows:
        _insert_after_table(lines, _marker("align"), [format_align_row(row, run) for row in align_rows])
    path.write_text("\n".join(lines) + "\n")
    return run


def add_ratios(rows: list[Row]) -> None:
    """Ours over transformers, tokens/s, for the same shape, workload and packing; where transformers has no packed
    row (no flash-attn), our packed rows are set against its padded ones, its fastest path then."""
    theirs = {
        (row.shape, row.workload, row.packing): row.tokens_per_s
        for row in rows
        if row.implementation == "transformers" and row.tokens_per_s
    }
    for row in rows:
        key = (row.shape, row.workload, row.packing)
        baseline = theirs.get(key) or theirs.get((row.shape, row.workload, "padded"))
        if row.implementation == "prism_mcore" and row.tokens_per_s and baseline:
            row.vs_transformers = row.tokens_per_s / baseline


def versions() -> str:
    names = ("torch", "megatron-core", "megatron-bridge", "transformers", "transformer-engine", "triton")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            if name == "transformer-engine":
                found.append("no transformer-engine")
    if torch.version.cuda:
        found.append(f"CUDA {torch.version.cuda}")
    return ", ".join(found)


def target_lines(rows: list[Row], device: torch.device) -> list[str]:
    """The GPU targets (MFU >= 40 % for the 2B policy step, >= 1.5x transformers), checked on this run's rows."""
    if device.type != "cuda":
        return ["targets (MFU >= 40 %, >= 1.5x transformers) apply to the 2B shape on a GPU: not checked on CPU"]
    lines = []
    for row in rows:
        full_2b = row.shape == POLICY_SHAPES["2b"].label
        if row.implementation != "prism_mcore" or not full_2b or row.workload not in ("sft", "rl"):
            continue
        if row.variant != "packed":
            continue
        mfu = "n/a" if row.mfu is None else f"{100 * row.mfu:.1f} % ({'met' if row.mfu >= 0.4 else 'not met'})"
        ratio = (
            "n/a"
            if row.vs_transformers is None
            else f"{row.vs_transformers:.2f}x ({'met' if row.vs_transformers >= 1.5 else 'not met'})"
        )
        lines.append(f"target 2B {row.workload}: MFU {mfu}; vs transformers {ratio}")
    return lines


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def _choices(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown:
        raise SystemExit(f"{flag}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return chosen


def parse_args(argv: list[str] | None, on_gpu: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2b,4b,8b" if on_gpu else "tiny", help="comma list of 2b, 4b, 8b, tiny")
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS + ALIGN_WORKLOADS)
    )
    parser.add_argument("--align-n", default="4,8,16", help="align-*: responses per prompt, comma list")
    parser.add_argument("--align-prompts", type=int, default=4, help="align-*: prompts per step")
    parser.add_argument("--align-policy", default="", help="align-*: HF policy folder (default: the embedded one)")
    parser.add_argument("--align-discriminator", default="", help="align-*: HF D folder (default: the embedded one)")
    parser.add_argument("--implementations", default="prism_mcore,transformers", help="prism_mcore, transformers")
    parser.add_argument("--variants", default=",".join(OUR_VARIANTS), help="ours: " + ", ".join(OUR_VARIANTS))
    parser.add_argument("--hf-variants", default=",".join(HF_VARIANTS), help="transformers: packed, padded")
    parser.add_argument("--layers", type=int, default=0, help="language layers of every shape (0: the table's)")
    parser.add_argument("--microbatches", type=int, default=4 if on_gpu else 2, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=5 if on_gpu else 2, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2 if on_gpu else 1, help="untimed steps first")
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "te", "sdpa"], help="ours")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="markdown file to add results to")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the random checkpoints are written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.shapes = _choices(args.shapes, list(POLICY_SHAPES), "--shapes")
    args.workloads = _choices(args.workloads, WORKLOADS + ALIGN_WORKLOADS, "--workloads")
    args.align_n = [int(n) for n in args.align_n.split(",") if n.strip()]
    args.implementations = _choices(args.implementations, ("prism_mcore", "transformers"), "--implementations")
    args.variants = _choices(args.variants, OUR_VARIANTS, "--variants")
    args.hf_variants = _choices(args.hf_variants, HF_VARIANTS, "--hf-variants")
    if not on_gpu and any(shape != "tiny" for shape in args.shapes):
        raise SystemExit("--shapes: the Qwen3-VL shapes need a GPU; on CPU use --shapes tiny")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = parse_args(argv, on_gpu=device.type == "cuda")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    from prism_mcore.config.schema import ParallelConfig
    from prism_mcore.models.qwen3_vl import resolve_dtype
    from prism_mcore.runtime import init_distributed, shutdown

    env = init_distributed(ParallelConfig(), seed=args.seed)
    if env.world_size != 1:
        raise SystemExit("tools/benchmark.py measures one process on one device: run it with python, not torchrun")
    dtype = resolve_dtype("auto")
    bench = Bench(device, args.microbatches, args.warmup, args.steps, peak_tflops(device, args.peak_tflops))
    command = " ".join(["python tools/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    work_dir = Path(tempfile.mkdtemp(prefix="prism-bench-", dir=args.work_dir))
    align_rows: list[AlignRow] = []
    try:
        for name in args.shapes if any(w in WORKLOADS for w in args.workloads) else []:
            for shapes, workloads in (
                (POLICY_SHAPES, [w for w in args.workloads if w in WORKLOADS and w != "disc"]),
                (DISCRIMINATOR_SHAPES, [w for w in args.workloads if w == "disc"]),
            ):
                if not workloads:
                    continue
                if name not in shapes:
                    bench.note(f"disc not run at {name}: the discriminator runs at the 2B shape only (PRISM's D)")
                    continue
                shape = replace(shapes[name], layers=args.layers) if args.layers else shapes[name]
                plan = workload_for(name, discriminator=bool(shape.experts))
                folder = work_dir / f"{name}-{'moe' if shape.experts else 'dense'}"
                torch.manual_seed(args.seed)
                model = random_checkpoint(shape, folder, device, dtype)
                if "transformers" in args.implementations:
                    run_transformers(bench, model, shape, plan, workloads, args.hf_variants)
                del model
                free_memory()
                if "prism_mcore" in args.implementations:
                    run_ours(bench, folder, shape, plan, workloads, args.variants, args.attention_backend)
                shutil.rmtree(folder)
        align = [w for w in args.workloads if w in ALIGN_WORKLOADS]
        if align:
            align_rows = run_alignment(
                align,
                args.align_n,
                args.align_prompts,
                args.warmup,
                args.steps,
                work_dir,
                (args.align_policy, args.align_discriminator),
            )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    add_ratios(bench.rows)
    label = device_label(device)
    if device.type != "cuda":
        label += ": CPU numbers, tiny shapes (shows the harness works, not how fast anything is)"
        if not bench.peak_tflops:
            bench.note("no MFU on CPU (no stated peak)")
    run_row = {
        "date": datetime.date.today().isoformat(),
        "device": label,
        "versions": versions(),
        "command": f"`{command}`",
        "notes": "; ".join(
            [f"{args.microbatches} micro-batches/step, median of {args.steps} steps after {args.warmup}", *bench.notes]
        ),
    }
    run = append_results(args.out, bench.rows, run_row, align_rows)
    if args.json:
        rows = [asdict(r) for r in bench.rows] + [asdict(r) for r in align_rows]
        args.json.write_text(json.dumps({"run": {"number": run, **run_row}, "rows": rows}))
    for line in target_lines(bench.rows, device):
        print(line, flush=True)
    print(f"run {run} written to {args.out}", flush=True)
    shutdown()
    return bench.rows


if __name__ == "__main__":
    main()
