"""`training/logprobs.py` on the Megatron policy against transformers' log-softmax on the same weights: log-probs and
entropy of packed sequences at temperature 0.7, and their gradients (TP=2 and PP=2 in the distributed tests)."""

from __future__ import annotations

import pytest
import torch

from prism_mcore.config.schema import ParallelConfig
from prism_mcore.data.batching import pack_token_ids
from prism_mcore.models import build_policy, forward_kwargs
from prism_mcore.record import ImageInputs
from prism_mcore.training.logprobs import LogProbRequest, logprobs_output_processor, token_logprobs
from tests.unit.models.conftest import FP32_SDPA
from tests.unit.models.tiny_checkpoints import hf_forward, image_text_inputs, text_inputs

TEMPERATURE = 0.7


def _batch_and_sequences():
    image_text, text = image_text_inputs(), text_inputs()
    sequences = [text, image_text]
    batch = pack_token_ids(
        [x["input_ids"][0] for x in sequences],
        [None, ImageInputs(image_text["pixel_values"], image_text["image_grid_thw"])],
    )
    return batch, sequences


def _reference(hf_dense, sequences, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_p = torch.cat(
        [torch.log_softmax(hf_forward(hf_dense, x, grad=True).logits[0] / TEMPERATURE, -1) for x in sequences]
    )
    return log_p.gather(-1, targets[0, :, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def test_output_processor_matches_transformers_with_gradients(runtime, dense_dir, hf_dense) -> None:
    policy = build_policy(FP32_SDPA, ParallelConfig(), path=dense_dir)  # own copy: this test accumulates grads
    batch, sequences = _batch_and_sequences()
    targets, valid = batch.next_token_targets()
    logprobs, entropy = policy.chunks[0](
        **forward_kwargs(batch),
        output_processor=logprobs_output_processor,
        output_processor_context=LogProbRequest(targets, temperature=TEMPERATURE),
    )
    ref_logprobs, ref_entropy = _reference(hf_dense, sequences, targets)
    assert logprobs.shape == entropy.shape == targets.shape and logprobs.dtype == torch.float32
    assert (logprobs[valid] - ref_logprobs[valid[0]]).abs().max().item() <= 1e-5
    assert (entropy[0] - ref_entropy).abs().max().item() <= 1e-5

    (logprobs[valid].sum() + 0.1 * entropy.sum()).backward()
    hf_dense.zero_grad()
    (ref_logprobs[valid[0]].sum() + 0.1 * ref_entropy.sum()).backward()
    language_model = policy.chunks[0].language_model
    pairs = [
        (language_model.output_layer.weight.grad, hf_dense.lm_head.weight.grad),
        (language_model.embedding.word_embeddings.weight.grad, hf_dense.model.language_model.embed_tokens.weight.grad),
        (
            policy.chunks[0].vision_model.patch_embed.proj.weight.grad,
            hf_dense.model.visual.patch_embed.proj.weight.grad,
        ),
    ]
    hf_dense.zero_grad()
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_logits_and_hidden_state_paths_agree(policy) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 64, generator=generator)
    targets = torch.randint(0, 256, (2, 5), generator=generator)
    weight = policy.chunks[0].language_model.output_layer.weight
    from_hidden = token_logprobs(targets, hidden=hidden, output_weight=weight, temperature=1.3)
    from_logits = token_logprobs(targets, logits=hidden @ weight.T, temperature=1.3)
    for a, b in zip(from_hidden, from_logits, strict=True):
        torch.testing.assert_close(a, b)
    log_p = torch.log_softmax((hidden @ weight.T) / 1.3, -1)
    torch.testing.assert_close(from_logits[0], log_p.gather(-1, targets[..., None]).squeeze(-1))


def test_inputs_are_validated(policy) -> None:
    with pytest.raises(ValueError, match="either logits"):
        token_logprobs(torch.zeros(1, 2, dtype=torch.long), hidden=torch.zeros(1, 2, 64))
