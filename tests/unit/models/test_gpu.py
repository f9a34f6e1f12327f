"""The production precision and backends on CUDA: bf16 models on Transformer Engine and on torch SDPA against
transformers in fp32, and packed (THD) batches against per-sequence forwards. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prism_mcore.config.schema import ModelConfig, ParallelConfig
from prism_mcore.data.batching import pack_token_ids
from prism_mcore.models import build_discriminator, build_policy, forward_kwargs
from prism_mcore.record import ImageInputs
from prism_mcore.runtime.compat import has_transformer_engine
from tests.unit.models.tiny_checkpoints import hf_forward, image_text_inputs, text_inputs

pytestmark = pytest.mark.gpu

BACKENDS = [
    "sdpa",
    pytest.param("te", marks=pytest.mark.skipif(not has_transformer_engine(), reason="needs transformer-engine")),
]
BF16_TOL = 5e-2  # bf16 weights and activations against an fp32 reference; logits of the tiny model are O(1)


def _cuda(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in inputs.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logits_close_to_transformers(runtime, dense_dir: Path, hf_dense, backend: str) -> None:
    policy = build_policy(ModelConfig(dtype="bfloat16", attention_backend=backend), ParallelConfig(), path=dense_dir)
    policy.eval()
    assert next(policy.chunks[0].parameters()).dtype == torch.bfloat16
    for inputs in (image_text_inputs(), text_inputs()):
        with torch.no_grad():
            logits = policy.chunks[0](**_cuda(inputs)).float().cpu()
        assert (logits - hf_forward(hf_dense, inputs).logits).abs().max().item() <= BF16_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_packed_batch_matches_per_sequence(runtime, dense_dir: Path, backend: str) -> None:
    policy = build_policy(ModelConfig(dtype="bfloat16", attention_backend=backend), ParallelConfig(), path=dense_dir)
    policy.eval()
    image_text, text = image_text_inputs(), text_inputs()
    batch = pack_token_ids(
        [text["input_ids"][0], image_text["input_ids"][0]],
        [None, ImageInputs(image_text["pixel_values"], image_text["image_grid_thw"])],
    ).to("cuda")
    with torch.no_grad():
        packed = policy.chunks[0](**forward_kwargs(batch)).float()
        single = torch.cat([policy.chunks[0](**_cuda(x)).float()[0] for x in (text, image_text)])
    assert (packed[0] - single).abs().max().item() <= BF16_TOL


def test_fp32_sdpa_on_gpu_matches_transformers(runtime, dense_dir: Path, hf_dense) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding is a conv
    policy = build_policy(ModelConfig(dtype="float32", attention_backend="sdpa"), ParallelConfig(), path=dense_dir)
    inputs = image_text_inputs()
    with torch.no_grad():
        logits = policy.eval().chunks[0](**_cuda(inputs)).cpu()
    assert (logits - hf_forward(hf_dense, inputs).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_discriminator_scores(runtime, moe_dir: Path, hf_moe, backend: str) -> None:
    disc = build_discriminator(ModelConfig(dtype="bfloat16", attention_backend=backend), ParallelConfig(), path=moe_dir)
    head = disc.chunks[0].module.language_model.output_layer.weight.float().cpu()  # under Float16Module
    assert head.shape == (1, 64)
    inputs = image_text_inputs()
    with torch.no_grad():
        scores = disc.eval().chunks[0](**_cuda(inputs)).float().cpu()
    hidden = hf_forward(hf_moe.model, inputs).last_hidden_state
    assert (scores - hidden @ head.T).abs().max().item() <= BF16_TOL
