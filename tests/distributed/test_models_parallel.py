"""Qwen3-VL on Megatron in parallel layouts (torchrun, gloo, fp32 on CPU) against transformers on the same weights.

One worker launch per layout checks everything at once (tests/distributed/workers/models_parallel.py):
* TP=2 and PP=2, dense with tied embeddings (as Qwen3-VL-2B/4B): logits of two images + text and of text only,
  a packed 3-sequence batch, log-probs/entropy at temperature 0.7 and their gradients, bit-exact HF export, and
  a perturbed model written with `save_hf` (transformers reloads it) and as a dist checkpoint;
* EP=2, Qwen3-VL-MoE (4 experts, top-2) with different tokens on each rank: logits, router logits, the reference
  aux loss, discriminator scores, bit-exact export with fused experts, a perturbed discriminator dist checkpoint;
* TP=2, Qwen3-VL-MoE with sequence parallelism (the bridge turns it on with TP): packed batches of an even and an
  odd token count (padded to the TP size), logits, aux loss, discriminator scores and the value head's gradient, a
  perturbed discriminator dist checkpoint (sequence-parallel norms, value head);
* one rank reloads the TP=2 policy and the EP=2 and TP=2 discriminator checkpoints: same logits and scores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.torchrun import run_torchrun
from tests.unit.models.tiny_checkpoints import write_dense, write_moe

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "workers" / "models_parallel.py"
LAYOUTS = {
    "tp2": ["--model", "dense", "--tp", "2"],
    "pp2": ["--model", "dense", "--pp", "2"],
    "ep2": ["--model", "moe", "--ep", "2"],
    "moe_tp2": ["--model", "moe", "--tp", "2"],
}
TOL = 1e-4
# Reloaded (TP=1) against saved (TP=2 / EP=2) outputs: the same fp32 weights, so only the summation order of the
# row-parallel all-reduce and of packed vs. unpadded attention differs (~1e-6 on these O(1) logits and scores).
RELOAD_TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("models_parallel")
    (root / "dense").mkdir()
    dense = write_dense(root / "dense", tie_word_embeddings=True)
    moe = write_moe(root / "moe", dense)
    common = ["--dense", str(dense), "--moe", str(moe)]
    results = {
        name: run_torchrun(WORKER, 2, root / name, [*common, *args, "--save", str(root / name / "save")])
        for name, args in LAYOUTS.items()
    }
    saved = [root / "tp2" / "save" / "dense_ckpt", *(root / name / "save" / "disc_ckpt" for name in ("ep2", "moe_tp2"))]
    results["reload"] = run_torchrun(WORKER, 1, root / "reload", [*common, "--reload", ",".join(map(str, saved))])
    return results


def _merged(ranks: list[dict]) -> dict:
    """One dict of everything the ranks reported (PP: logits on the last stage, vision gradients on the first)."""
    merged: dict = {}
    for rank in ranks:
        merged.update(rank)
    return merged


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_dense_logits_match_transformers(runs, layout: str) -> None:
    result = _merged(runs[layout])
    for key in ("logits_image_text", "logits_text", "logits_packed"):
        assert result[key] <= TOL, (key, result[key])


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_logprobs_entropy_and_gradients_match_transformers(runs, layout: str) -> None:
    result = _merged(runs[layout])
    assert result["logprobs"] <= TOL and result["entropy"] <= TOL
    for key in ("grad_final_norm", "grad_patch_embed"):
        assert result[key] <= 1e-5 * max(result[f"{key}_scale"], 1.0), (key, result[key])


@pytest.mark.parametrize("layout", ["tp2", "pp2", "ep2"])
def test_export_stream_is_bit_exact_on_every_rank(runs, layout: str) -> None:
    for rank in runs[layout]:
        assert rank["export_names_equal"] and rank["export_mismatches"] == []


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_save_hf_reloads_in_transformers(runs, layout: str) -> None:
    result = _merged(runs[layout])
    diff = (torch.tensor(result["save_hf_logits"]) - torch.tensor(result["perturbed_logits"])).abs().max()
    assert diff.item() <= TOL


def test_moe_and_discriminator_with_expert_parallelism(runs) -> None:
    for rank in runs["ep2"]:
        assert rank["logits"] <= TOL and rank["router_logits"] <= TOL and rank["scores"] <= TOL
        assert rank["aux_loss"] == pytest.approx(rank["hf_aux_loss"], rel=1e-5)


def test_moe_with_tensor_and_sequence_parallelism(runs) -> None:
    for rank in runs["moe_tp2"]:
        assert rank["sequence_parallel"] is True
        assert rank["padded_tokens_even"] == 36 and rank["padded_tokens_odd"] == 36  # 23 + 13; 23 + 12 + 1 pad
        for name in ("even", "odd"):
            assert rank[f"logits_{name}"] <= TOL and rank[f"aux_loss_{name}"] <= 1e-6
        assert rank["scores"] <= TOL and rank["head_grad"] <= TOL


def _max_abs_diff(a: list, b: list) -> float:
    return (torch.tensor(a) - torch.tensor(b)).abs().max().item()


def test_checkpoints_reshard_to_one_rank(runs) -> None:
    (reload,) = runs["reload"]
    assert _max_abs_diff(reload["logits"], _merged(runs["tp2"])["perturbed_logits"]) <= RELOAD_TOL
    ep2_scores, tp2_scores = reload["scores"]
    assert _max_abs_diff(ep2_scores, runs["ep2"][0]["perturbed_scores"]) <= RELOAD_TOL  # rank 0 scored image+text
    for rank in runs["moe_tp2"]:  # sequence-parallel: both TP ranks hold every token's score
        assert _max_abs_diff(tp2_scores, rank["perturbed_scores"]) <= RELOAD_TOL
