"""tools/benchmark.py: its FLOP formula against a hand count and against the models' own weights, the published
shapes, a tiny end-to-end run (on CPU: rows with finite numbers labelled CPU), that both implementations compute the
same losses on the same micro-batches, and `model.fp8`: refused without Transformer Engine, wired with it."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prism_mcore.config.schema import ModelConfig, ParallelConfig

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_model_flops_of_the_tiny_shape_by_hand(bench) -> None:
    # Language model: h=64, L=4, 4 query / 2 KV heads of 16, SwiGLU 128, vocabulary 256 (log-probs over all of it).
    per_token_macs = 4 * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128) + 64 * 256  # 147,456 + 16,384 = 163,840
    # Vision: patches of 3*2*16*16 = 1536 values into hidden 32, 2 blocks (qkv + proj 4*32^2, MLP 2*32*64);
    # mergers (main + 2 deepstack) on merged tokens of 4 patches: 128 -> 128 -> 64.
    per_patch_macs = 1536 * 32 + 2 * (4 * 32**2 + 2 * 32 * 64)  # 65,536
    per_merged_macs = 3 * (128 * 128 + 128 * 64)  # 73,728
    workload = bench.Workload(lengths=(10, 6), grids=((1, 4, 4), (1, 2, 2)))  # 16 + 4 patches, 4 + 1 merged tokens
    matmuls = 2 * (16 * per_token_macs + 20 * per_patch_macs + 5 * per_merged_macs)  # 5,242,880 + 2,621,440 + 737,280
    text_attention = 4 * 4 * 4 * 16 * (55 + 21)  # causal pairs: 10*11/2 + 6*7/2 -> 77,824
    vision_attention = 4 * 2 * 32 * (16**2 + 4**2)  # 69,632
    forward = matmuls + text_attention + vision_attention
    assert forward == 8_749_056

    shape = bench.POLICY_SHAPES["tiny"]
    assert bench.model_flops(shape, workload, training=False) == forward
    assert bench.model_flops(shape, workload, training=True) == 3 * forward

    # The discriminator: 4 experts, top-2 (3*2*64*128 + router 64*4 per layer) and a one-output value head.
    moe_macs = 4 * (64 * 16 * 12 + 3 * 2 * 64 * 128 + 64 * 4) + 64
    moe_forward = forward + 2 * 16 * (moe_macs - per_token_macs)
    assert bench.model_flops(bench.DISCRIMINATOR_SHAPES["tiny"], workload, training=False) == moe_forward


@pytest.mark.parametrize("name", ["2b", "4b", "8b", "tiny", "D 2b", "D tiny"])
def test_flop_parameters_are_the_models_matmul_weights(bench, name: str) -> None:
    """N_text, N_patch and N_merged of the formula against the weights of the transformers model (built on meta)."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    shape = bench.DISCRIMINATOR_SHAPES[name[2:]] if name.startswith("D ") else bench.POLICY_SHAPES[name]
    cls = Qwen3VLMoeForConditionalGeneration if shape.experts else Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        model = cls._from_config(bench.hf_config(shape))
    language, vision = model.model.language_model, model.model.visual

    def weights(module: torch.nn.Module, only: str = "") -> int:
        return sum(p.numel() for n, p in module.named_parameters() if p.dim() >= 2 and only in n)

    layers = weights(language.layers)
    if shape.experts:  # a token meets top_k of the experts (and the whole router, `mlp.gate`)
        layers -= weights(language.layers, only="experts") * (shape.experts - shape.top_k) // shape.experts
    head = shape.hidden * (1 if shape.experts else shape.vocab)  # D: the value head instead of the vocabulary
    params = bench.matmul_params(shape)
    assert params.per_token == layers + head
    assert params.per_patch == vision.patch_embed.proj.weight.numel() + weights(vision.blocks)
    assert params.per_merged == weights(vision.merger) + weights(vision.deepstack_merger_list)


def test_published_shapes(bench) -> None:
    """Sizes of the released Qwen3-VL checkpoints, layers truncated where stated."""
    two, four, eight = (bench.POLICY_SHAPES[name] for name in ("2b", "4b", "8b"))
    assert (two.hidden, two.ffn, two.heads, two.kv_heads, two.published_layers, two.layers) == (
        2048,
        6144,
        16,
        8,
        28,
        28,
    )
    assert (four.hidden, four.ffn, four.heads, four.published_layers) == (2560, 9728, 32, 36)
    assert (eight.hidden, eight.ffn, eight.heads, eight.published_layers, eight.tie_embeddings) == (
        4096, 12288, 32, 36, False
    )  # fmt: skip
    assert (eight.vision_depth, eight.vision_hidden, eight.vision_ffn, eight.deepstack) == (27, 1152, 4304, (8, 16, 24))
    assert bench.POLICY_WORKLOAD.tokens == bench.DISCRIMINATOR_WORKLOAD.tokens == 4096
    config = bench.hf_config(bench.DISCRIMINATOR_SHAPES["2b"])
    assert (config.text_config.num_experts, config.text_config.num_experts_per_tok) == (4, 2)
    assert config.text_config.moe_intermediate_size == 6144


def test_tiny_run_writes_labelled_rows(bench, tmp_path: Path) -> None:
    """The tiny shapes end to end (on CPU: the default run), every row with finite numbers and its device."""
    from prism_mcore.runtime.compat import has_transformer_engine

    on_gpu = torch.cuda.is_available()
    out, rows_json = tmp_path / "BENCHMARKS.md", tmp_path / "rows.json"
    command = [sys.executable, str(TOOL), "--shapes", "tiny", "--steps", "1", "--warmup", "0", "--microbatches", "1"]
    command += ["--out", str(out), "--json", str(rows_json)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    result = json.loads(rows_json.read_text())
    rows = result["rows"]
    # Ours: packed, padded, recompute (not for log-probs), and both FP8 recipes where TE runs; transformers: padded,
    # and packed only on flash-attn's variable-length kernel (never through a dense block mask).
    fp8 = 2 if on_gpu and has_transformer_engine() else 0
    varlen = int(bench.flash_varlen_available(torch.device("cuda" if on_gpu else "cpu")))
    expected = {"sft": 4 + fp8 + varlen, "rl": 4 + fp8 + varlen, "disc": 4 + fp8 + varlen, "logprobs": 3 + fp8 + varlen}
    assert {w: sum(r["workload"] == w for r in rows) for w in expected} == expected
    for row in rows:
        assert not row["note"], row
        for key in ("step_ms", "tokens_per_s", "model_tflops", "peak_mib"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        if row["implementation"] == "prism_mcore":
            assert row["vs_transformers"] > 0
    if not fp8:
        assert "fp8-delayed not measured: model.fp8='delayed' needs" in result["run"]["notes"]
    if not varlen:
        assert "transformers packed not measured: without flash-attn's variable-length kernel" in result["run"]["notes"]
        assert not any(r["implementation"] == "transformers" and r["variant"] == "packed" for r in rows)

    text = out.read_text()
    if on_gpu:
        assert all(row["device"] == torch.cuda.get_device_name() for row in rows)
        assert text.count("| 1 | tiny") == len(rows)
        return
    assert all(row["device"].startswith("CPU") and row["mfu"] is None for row in rows)  # no stated peak on CPU
    assert "CPU numbers, tiny shapes" in result["run"]["device"]
    assert text.count("| 1 (CPU) | tiny") == len(rows)  # every row of run 1 in its workload's table, labelled CPU
    assert "| 1 | " + result["run"]["date"] + " | CPU" in text


def test_both_implementations_compute_the_same_losses(bench, tmp_path: Path, monkeypatch) -> None:
    """The harness gives transformers and prism_mcore the same work: same micro-batches, same losses (fp32)."""
    from prism_mcore.algorithms import policy_loss_preset
    from prism_mcore.models import build_policy
    from prism_mcore.runtime import init_distributed
    from prism_mcore.training.forward import policy_forward, sft_forward
    from prism_mcore.training.step import forward_metrics

    init_distributed(ParallelConfig(), seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch embedding is a convolution
    shape, plan = bench.POLICY_SHAPES["tiny"], bench.TINY_POLICY_WORKLOAD
    hf_model = bench.random_checkpoint(shape, tmp_path, device, torch.float32).eval()
    ours = build_policy(ModelConfig(dtype="float32", attention_backend="sdpa"), ParallelConfig(), path=tmp_path).eval()
    for workload, forward_step, metric in (
        ("sft", sft_forward, "loss"),
        ("rl", policy_forward(policy_loss_preset("grpo")), "pg_loss"),
    ):
        for padded in (False, True):
            with torch.no_grad():
                theirs = sum(
                    bench.hf_loss(workload, hf_model, None, batch, plan, 2).item()
                    for batch in bench.to_device(bench.hf_microbatches(shape, workload, plan, 2, padded), device)
                )
            batches = bench.to_device(bench.our_microbatches(shape, workload, plan, 2, padded), device)
            mine = forward_metrics(ours.chunks, forward_step, batches)
            assert mine[metric] == pytest.approx(theirs, abs=1e-5), (workload, padded)


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fp8_is_refused_without_transformer_engine(monkeypatch, tmp_path: Path, recipe: str) -> None:
    from prism_mcore.models import backend, build_policy
    from prism_mcore.runtime import init_distributed
    from tests.unit.models.tiny_checkpoints import write_dense

    monkeypatch.setattr(backend, "has_transformer_engine", lambda: False)
    init_distributed(ParallelConfig(), seed=0)
    with pytest.raises(ValueError) as refusal:
        build_policy(ModelConfig(fp8=recipe), ParallelConfig(), path=write_dense(tmp_path))
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith(f"model.fp8={recipe!r} needs transformer-engine, which is not installed")


def test_fp8_settings_with_transformer_engine(monkeypatch) -> None:
    from prism_mcore.models import backend

    monkeypatch.setattr(backend, "has_transformer_engine", lambda: True)
    assert backend.fp8_settings("none", "sdpa") == {}
    assert backend.fp8_settings("delayed", "te") == {"fp8": "hybrid", "fp8_recipe": "delayed"}
    assert backend.fp8_settings("current", "te") == {"fp8": "hybrid", "fp8_recipe": "tensorwise"}
    with pytest.raises(ValueError, match=r"^model.fp8='delayed' needs Transformer Engine layers.*'sdpa'"):
        backend.fp8_settings("delayed", "sdpa")


def test_right_padded_batches_pad_after_each_sequence_with_a_mask(bench) -> None:
    """transformers' padded variant of the benchmark: the trainer only packs, so the benchmark pads on its own."""
    from prism_mcore.data.samples import IGNORE_INDEX, TokenSequence
    from prism_mcore.record import ImageInputs

    def sequence(ids: list[int], labels: list[int], score: int, images: int) -> TokenSequence:
        positions = torch.stack([torch.arange(len(ids)) * 10 + row for row in range(3)])
        image = ImageInputs(torch.full((4 * images, 2), float(ids[0])), torch.tensor([[1, 2, 2]] * images))
        return TokenSequence(torch.tensor(ids), positions, torch.tensor(labels), image if images else None, score)

    batch = bench.right_padded(
        [sequence([1, 2, 3], [IGNORE_INDEX, 2, 3], 2, images=1), sequence([4, 5], [IGNORE_INDEX, 5], 1, images=2)],
        pad_id=0,
    )
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch.position_ids[1].tolist() == [[1, 11, 21], [1, 11, 0]]
    assert batch.score_indices.tolist() == [2, 1]
    assert batch.pixel_values[:, 0].tolist() == [1.0] * 4 + [4.0] * 8 and batch.image_grid_thw.shape == (3, 3)


def test_alignment_rows_go_to_their_own_table_and_the_before_side_encodes_per_microbatch(bench, tmp_path) -> None:
    """The align-* rows: their numbers as written (work per prompt against the reference's 6n / 2n), a table added
    to a BENCHMARKS.md that predates it, and the "before" switch that gives `training.step` no step image cache."""
    import prism_mcore.training.step as step_module
    from prism_mcore.models import step_images

    row = bench.AlignRow(
        workload="align-d", n=8, prompts=4, device="CPU (2 threads)", before_ms=2000.0, after_ms=1500.0,
        d_images_before=3.5, d_images_after=1.0, policy_images_before=2.25, policy_images_after=1.0,
        d_sequences=20.0, d_tokens=2741.0, reference_d_tokens=6630.0,
    )  # fmt: skip
    assert row.ratio == 0.75
    line = bench.format_align_row(row, run=3)
    assert line == (
        "| 3 | align-d | 8 | 4 | CPU (2 threads) | 2,000 | 1,500 | 0.75 | 3.5, 1 (48) | 2.25, 1 (16) | 20 (48) "
        "| 2,741 (6,630) |"
    )
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(bench.skeleton().replace(bench._align_section(), "") + "\n## Kernels\n")
    run_row = {"date": "2026-12-03", "device": "CPU", "versions": "v", "command": "c", "notes": "n"}
    assert bench.append_results(out, [], run_row, [row]) == 1
    text = out.read_text()
    assert text.index(bench.ALIGN_TITLE) < text.index(bench.TITLES["logprobs"]) < text.index("## Kernels")
    assert line.replace("| 3 |", "| 1 |") in text.splitlines()

    with bench.image_encoding(before=True):
        with step_module.step_images([]) as images:
            assert isinstance(images, bench._NoStepImages)
    assert step_module.step_images is step_images
