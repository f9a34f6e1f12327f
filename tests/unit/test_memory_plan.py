"""tools/memory_plan.py: parameter counts equal transformers' models of the same config (built on the meta device),
the per-parameter bytes follow the documented layout rules, and offloading the idle model removes exactly its
gradients and optimizer state from the phases where it waits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import benchmark  # noqa: E402
import memory_plan  # noqa: E402


def _hf_parameters(shape, value_head: bool) -> int:
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    cls = Qwen3VLMoeForConditionalGeneration if shape.experts else Qwen3VLForConditionalGeneration
    config = benchmark.hf_config(shape)
    with torch.device("meta"):
        model = cls._from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings are counted once
    if value_head:  # D: the value head Linear(H, 1) replaces the (untied) vocabulary projection
        tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
        total += shape.hidden - (0 if tied else model.lm_head.weight.numel())
    return total


@pytest.mark.parametrize(
    "shape, value_head",
    [
        (benchmark.POLICY_SHAPES["tiny"], False),
        (benchmark.DISCRIMINATOR_SHAPES["tiny"], True),
        (benchmark.POLICY_SHAPES["4b"], False),
        (benchmark.POLICY_SHAPES["8b"], False),
        (benchmark.DISCRIMINATOR_SHAPES["2b"], True),
    ],
    ids=["tiny", "tiny-D", "4B", "8B", "2B-MoE-D"],
)
def test_parameter_counts_equal_transformers(shape, value_head: bool) -> None:
    full = shape.__class__(**{**shape.__dict__, "layers": shape.published_layers})
    assert memory_plan.count_parameters(shape, value_head=value_head).total == _hf_parameters(full, value_head)


def test_published_sizes() -> None:
    four_b = memory_plan.count_parameters(benchmark.POLICY_SHAPES["4b"]).total
    assert 4.43e9 < four_b < 4.45e9  # Qwen3-VL-4B-Instruct: 4.44 B parameters


def _layout(**changes) -> memory_plan.Layout:
    base = dict(gpus=8, tensor=1, pipeline=1, expert=1, distributed_optimizer=True, bf16=True, recompute=False,
                sequence_parallel=True)  # fmt: skip
    return memory_plan.Layout(**{**base, **changes})


def test_bytes_per_parameter() -> None:
    params = memory_plan.ParameterCount(layers=800, experts=0, first_stage=200, last_stage=10)
    memory = memory_plan.model_memory(params, _layout())
    assert (memory.weights, memory.gradients, memory.optimizer) == (2 * 1000, 4 * 1000, 12 * 1000 / 8)
    tp2 = memory_plan.model_memory(params, _layout(tensor=2, distributed_optimizer=False))
    assert (tp2.weights, tp2.optimizer) == (2 * 500, 12 * 500)  # DP 4 but no sharding of the optimizer
    pp2 = memory_plan.model_memory(params, _layout(pipeline=2, bf16=False))
    assert (pp2.weights, pp2.optimizer) == (4 * 600, 8 * 600 / 4)  # first stage: half the layers + embedding, vision
    moe = memory_plan.ParameterCount(layers=800, experts=4000, first_stage=200, last_stage=10)
    ep4 = memory_plan.model_memory(moe, _layout(expert=4))
    assert ep4.weights == 2 * (1000 + 1000) and ep4.optimizer == 12 * (1000 / 8 + 1000 / 2)


def test_offload_removes_the_idle_models_gradients_and_optimizer() -> None:
    rows = {}
    for offload in (False, True):
        config = memory_plan.apply_overrides(
            memory_plan.load_recipe(memory_plan.resolve_recipe("qwen3vl_4b_grpo")),
            [f"align.offload_idle_states={str(offload).lower()}"],
        )
        args = memory_plan.parse_args(["qwen3vl_4b_grpo"])
        shapes = benchmark.POLICY_SHAPES["4b"], benchmark.DISCRIMINATOR_SHAPES["2b"]
        plan = memory_plan.plan(config, *shapes, _layout(), args)
        rows[offload] = {(row.stage, row.phase): row for row in plan}
    policy = memory_plan.model_memory(memory_plan.count_parameters(benchmark.POLICY_SHAPES["4b"]), _layout())
    d_phase = ("align", "D score + update")
    saved = rows[False][d_phase].total - rows[True][d_phase].total
    assert saved == pytest.approx(policy.gradients + policy.optimizer)
    assert rows[True][d_phase].parts["policy weights"] == policy.weights
    assert rows[True][("sft", "train")].total == rows[False][("sft", "train")].total  # SFT trains one model
    # the released 4B recipe fits an 80 GB H100 in every phase only with the offload
    fits = {offload: all(r.total < memory_plan.H100_80GB_GIB * memory_plan.GIB for r in rows[offload].values())
            for offload in rows}  # fmt: skip
    assert fits == {False: False, True: True}


def test_the_cli_prints_every_phase(capsys) -> None:
    rows = memory_plan.main(["qwen3vl_4b_dapo", "--gpus", "8"])
    printed = capsys.readouterr().out
    assert [(r.stage, r.phase) for r in rows][:2] == [("sft", "train"), ("warmup", "train")]
    assert printed.count("\n| ") == len(rows) + 1 and "policy 4B 4.44B parameters" in printed
