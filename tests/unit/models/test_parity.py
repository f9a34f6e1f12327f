"""Megatron Qwen3-VL (dense and MoE, fp32, one rank) against transformers' `Qwen3VL*ForConditionalGeneration` on the
same weights: logits of image+text and text-only inputs, packed multi-sequence batches, padded batches of any padding
side, the vision tower with HF-exact GELU in its mergers, and the MoE router logits and load-balancing loss.
Tolerance: max |Δlogits| <= 1e-5 (measured about 2e-7; the distributed layouts are checked in
tests/distributed/test_models_parallel.py)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from prism_mcore.config.schema import ParallelConfig
from prism_mcore.data.batching import pack_padded, pack_token_ids, unpack_to_padded
from prism_mcore.models import forward_kwargs
from prism_mcore.record import ImageInputs
from tests.unit.models.conftest import FP32_SDPA
from tests.unit.models.tiny_checkpoints import hf_forward, image_text_inputs, text_inputs

TOL = 1e-5


def _images(inputs: dict[str, torch.Tensor]) -> ImageInputs:
    return ImageInputs(inputs["pixel_values"], inputs["image_grid_thw"])


@pytest.mark.parametrize("make_inputs", [image_text_inputs, text_inputs], ids=["two_images_and_text", "text_only"])
def test_dense_logits_match_transformers(policy, hf_dense, make_inputs) -> None:
    inputs = make_inputs()
    with torch.no_grad():
        logits = policy.chunks[0](**inputs)
    expected = hf_forward(hf_dense, inputs).logits
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= TOL


def test_packed_batch_equals_per_sequence_forwards(policy, hf_dense) -> None:
    image_text, text = image_text_inputs(), text_inputs()
    short = {"input_ids": text["input_ids"][:, :5]}
    sequences = [text, image_text, short, image_text]
    batch = pack_token_ids(
        [x["input_ids"][0] for x in sequences], [_images(x) if "pixel_values" in x else None for x in sequences]
    )
    with torch.no_grad():
        packed = policy.chunks[0](**forward_kwargs(batch))
    expected = torch.cat([hf_forward(hf_dense, x).logits[0] for x in sequences])
    assert (packed[0] - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("side", ["left", "right", "mixed"])
def test_padded_batch_of_any_side_via_packing(policy, hf_dense, side: str) -> None:
    image_text, text = image_text_inputs(), text_inputs(length=9)
    rows = [image_text["input_ids"][0], text["input_ids"][0]]
    width = max(len(r) for r in rows) + 2
    sides = {"left": ["left", "left"], "right": ["right", "right"], "mixed": ["right", "left"]}[side]
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, (row, pad_side) in enumerate(zip(rows, sides, strict=True)):
        cols = slice(width - len(row), width) if pad_side == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols] = row, 1
    batch = pack_padded(ids, mask, image_text["pixel_values"], image_text["image_grid_thw"])
    with torch.no_grad():
        padded = unpack_to_padded(policy.chunks[0](**forward_kwargs(batch)), mask)
    for i, inputs in enumerate((image_text, text)):
        expected = hf_forward(hf_dense, inputs).logits[0]
        assert (padded[i][mask[i].bool()] - expected).abs().max().item() <= TOL
    assert (padded[~mask.bool()] == 0).all()


def test_right_padded_batch_runs_directly(policy, hf_dense) -> None:
    image_text, text = image_text_inputs(), text_inputs(length=9)
    width = image_text["input_ids"].shape[1]
    ids = torch.zeros(2, width, dtype=torch.long)
    ids[0], ids[1, :9] = image_text["input_ids"][0], text["input_ids"][0]
    with torch.no_grad():
        logits = policy.chunks[0](
            input_ids=ids, pixel_values=image_text["pixel_values"], image_grid_thw=image_text["image_grid_thw"]
        )
    assert (logits[0] - hf_forward(hf_dense, image_text).logits[0]).abs().max().item() <= TOL
    assert (logits[1, :9] - hf_forward(hf_dense, text).logits[0]).abs().max().item() <= TOL


def test_vision_mergers_use_exact_gelu(policy, hf_dense) -> None:
    """The bridge ships tanh-GELU mergers; transformers uses exact GELU. The difference is visible on the tower."""
    inputs = image_text_inputs()
    tower = policy.chunks[0].vision_model
    mergers = [tower.merger, *tower.decoder.deepstack_merger_list]
    assert all(m.activation_func is F.gelu for m in mergers)

    def tower_error() -> float:
        with torch.no_grad():
            ours, ours_deepstack = tower(hidden_states=inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            hf = hf_dense.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        pairs = [(ours, hf.pooler_output), *zip(ours_deepstack, hf.deepstack_features, strict=True)]
        return max((a - b).abs().max().item() for a, b in pairs)

    exact = tower_error()
    try:
        for merger in mergers:
            merger.activation_func = functools.partial(F.gelu, approximate="tanh")
        approximate = tower_error()
    finally:
        for merger in mergers:
            merger.activation_func = F.gelu
    assert exact <= 1e-6 < approximate


@pytest.fixture(scope="module")
def moe_policy(runtime: None, moe_dir):
    from prism_mcore.models import build_policy

    return build_policy(FP32_SDPA, ParallelConfig(), path=moe_dir).eval()


@pytest.mark.parametrize("make_inputs", [image_text_inputs, text_inputs], ids=["two_images_and_text", "text_only"])
def test_moe_logits_router_logits_and_aux_loss_match_transformers(moe_policy, hf_moe, make_inputs) -> None:
    from prism_mcore.models import record_router_logits, router_load_balancing_loss

    inputs = make_inputs()
    with torch.no_grad(), record_router_logits(moe_policy.chunks) as router_logits:
        logits = moe_policy.chunks[0](**inputs)
    expected = hf_forward(hf_moe, inputs, output_router_logits=True)
    assert (logits - expected.logits).abs().max().item() <= TOL
    assert len(router_logits) == len(expected.router_logits) == 4
    for ours, theirs in zip(router_logits, expected.router_logits, strict=True):
        assert (ours.reshape(theirs.shape) - theirs).abs().max().item() <= 1e-4  # raw logits, larger magnitude
    aux = router_load_balancing_loss(router_logits, top_k=2)
    torch.testing.assert_close(aux, expected.aux_loss, rtol=1e-5, atol=0)


def test_router_logits_are_recorded_only_when_asked(moe_policy) -> None:
    from prism_mcore.models import record_router_logits
    from prism_mcore.models.router import RecordingTopKRouter

    routers = [m for m in moe_policy.chunks[0].modules() if isinstance(m, RecordingTopKRouter)]
    with torch.no_grad(), record_router_logits(moe_policy.chunks) as recorded:
        moe_policy.chunks[0](**text_inputs())
    assert len(recorded) == len(routers) == 4
    assert all(router.recorder is None for router in routers)  # nothing is kept outside the block


def test_megatron_aux_loss_is_off(moe_policy) -> None:
    # PRISM_SPEC §8.8: stage 2 must have no hidden aux-loss gradient; warmup adds the explicit loss instead.
    assert moe_policy.config.moe_aux_loss_coeff == 0.0
