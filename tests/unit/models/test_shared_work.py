"""Less work per forward, same results (issue 13): a micro-batch's repeated image encoded once (outputs and gradients
as with one copy per sequence), MRoPE positions passed in (as the model derives them), log-probs computed only at
the loss positions, D's eval-mode scores read off a training forward, and tiny fillers that run the losses."""

from __future__ import annotations

import pytest
import torch

from prism_mcore.config.schema import ParallelConfig
from prism_mcore.data.batching import pack_sequences, pack_token_ids
from prism_mcore.data.samples import TokenSequence, mrope_position_ids
from prism_mcore.models import build_discriminator, build_policy, forward_kwargs, record_eval_scores
from prism_mcore.record import ImageInputs
from prism_mcore.training.logprobs import LogProbRequest, logprobs_output_processor
from tests.unit.models.conftest import FP32_SDPA
from tests.unit.models.tiny_checkpoints import IMAGE, image_text_inputs, text_inputs


def _sequence(ids: torch.Tensor, images: ImageInputs | None) -> TokenSequence:
    grid = None if images is None else images.image_grid_thw
    return TokenSequence(ids, mrope_position_ids(ids, grid, IMAGE, 2), image_inputs=images, score_index=len(ids) - 1)


def _sequences() -> list[TokenSequence]:
    """Two sequences with the same two images (one object), a text-only one, and an equal copy of the images."""
    inputs = image_text_inputs()
    images = ImageInputs(inputs["pixel_values"], inputs["image_grid_thw"])
    copy = ImageInputs(images.pixel_values.clone(), images.image_grid_thw.clone())
    ids = inputs["input_ids"][0]
    return [
        _sequence(ids, images),
        _sequence(torch.cat([torch.tensor([7, 3]), ids[2:]]), images),
        _sequence(text_inputs()["input_ids"][0], None),
        _sequence(torch.cat([torch.tensor([9]), ids[1:]]), copy),
    ]


def test_pack_sequences_keeps_each_distinct_image_once() -> None:
    sequences = _sequences()
    every = pack_sequences(sequences)
    shared = pack_sequences(sequences, share_images=True)
    assert every.num_images == 6 and every.image_index is None
    assert shared.num_images == 2 and shared.image_index.tolist() == [0, 1, 0, 1, 0, 1]
    assert torch.equal(shared.pixel_values, sequences[0].image_inputs.pixel_values)
    assert torch.equal(shared.image_grid_thw, sequences[0].image_inputs.image_grid_thw)
    assert torch.equal(shared.input_ids, every.input_ids) and torch.equal(shared.position_ids, every.position_ids)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_shared_images_positions_and_loss_positions_leave_policy_outputs_and_gradients_unchanged(
    runtime, dense_dir
) -> None:
    policy = build_policy(FP32_SDPA, ParallelConfig(), path=dense_dir)
    model = policy.chunks[0]
    sequences = _sequences()
    # Reference: every sequence with its own images, positions derived by the model, log-probs everywhere.
    derived = pack_token_ids([s.input_ids for s in sequences], [s.image_inputs for s in sequences])
    shared = pack_sequences(sequences, share_images=True)
    targets, valid = shared.next_token_targets()
    positions = valid[0].nonzero().flatten()[::2]  # every other position carries a loss

    results = []
    for batch, request in (
        (derived, LogProbRequest(targets, temperature=0.7)),
        (shared, LogProbRequest(targets, temperature=0.7, positions=positions)),
    ):
        model.zero_grad()
        logprobs, entropy = model(
            **forward_kwargs(batch), output_processor=logprobs_output_processor, output_processor_context=request
        )
        (logprobs[0, positions].sum() + 0.1 * entropy[0, positions].sum()).backward()
        results.append((logprobs.detach(), entropy.detach(), _grads(model)))
    (ref_lp, ref_ent, ref_grads), (lp, ent, grads) = results
    torch.testing.assert_close(lp[0, positions], ref_lp[0, positions], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[0, positions], ref_ent[0, positions], atol=1e-5, rtol=0)
    others = torch.ones(lp.shape[1], dtype=torch.bool)
    others[positions] = False
    assert not lp[0, others].any() and not ent[0, others].any()  # not computed off the loss positions
    assert ref_lp[0, others].abs().sum() > 0
    assert grads.keys() == ref_grads.keys()
    assert any(name.startswith("vision_model") for name in grads)  # the shared encoding received its gradients
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("train", [True, False], ids=["train_mode", "eval_mode"])
def test_eval_scores_recorded_from_a_training_forward_equal_an_eval_forward(runtime, moe_dir, train: bool) -> None:
    discriminator = build_discriminator(FP32_SDPA, ParallelConfig(), path=moe_dir)
    model = discriminator.chunks[0]
    batch = pack_sequences(_sequences(), share_images=True)
    with torch.no_grad():
        expected = discriminator.eval().chunks[0](**forward_kwargs(batch))
        discriminator.train(train)
        with record_eval_scores(model) as recorded:
            scores = model(**forward_kwargs(batch))
    discriminator.train()
    assert len(recorded) == 1
    torch.testing.assert_close(recorded[0], expected, atol=1e-6, rtol=0)
    assert torch.equal(scores, expected) != train  # the update's own scores carry dropout in train mode


def test_tiny_fillers_run_the_losses_to_finite_values(runtime, dense_dir, moe_dir) -> None:
    from prism_mcore.algorithms import DiscriminatorLossConfig, policy_loss_preset
    from prism_mcore.training.forward import DiscriminatorBatch, discriminator_forward, policy_forward, token_batch

    sequences = _sequences()
    for sequence in sequences:
        sequence.labels = torch.where(torch.arange(len(sequence)) > 3, sequence.input_ids, -100)
    packed = pack_sequences(sequences, share_images=True)
    rollout = [[-1.0] * int(s.labels.ne(-100).sum()) for s in sequences]
    policy_filler = token_batch(packed, advantages=[1.0] * 4, rollout_logprobs=rollout).filler()
    assert policy_filler.packed.num_tokens == 2 and policy_filler.packed.num_images == 0
    policy = build_policy(FP32_SDPA, ParallelConfig(), path=dense_dir)
    step = policy_forward(policy_loss_preset("prism_align", tis_cap=2.0))
    output, loss_func = step(iter([policy_filler]), policy.chunks[0])
    numerator, denominator, metrics = loss_func(output)
    assert torch.isfinite(numerator) and int(denominator) == 1
    assert all(bool(torch.isfinite(value).all()) for value in metrics.values())

    d_batch = DiscriminatorBatch(packed, torch.tensor([True, False]), torch.tensor([0, 0]), 1, 1, torch.tensor([0, 1]))
    d_filler = d_batch.filler()
    assert d_filler.packed.num_sequences == 4 and d_filler.packed.num_tokens == 4
    recorded = []
    discriminator = build_discriminator(FP32_SDPA, ParallelConfig(), path=moe_dir)
    step = discriminator_forward(DiscriminatorLossConfig(), on_scores=lambda *scores: recorded.append(scores))
    output, loss_func = step(iter([d_filler]), discriminator.chunks[0])
    numerator, denominator, metrics = loss_func(output)
    assert torch.isfinite(numerator) and int(denominator) == 1
    assert all(bool(torch.isfinite(value).all()) for value in metrics.values())
    assert recorded[0][0].tolist() == [-1]  # a filler's scores belong to no sample


def _step_microbatches() -> list:
    """Three micro-batches over two distinct images A (two images per input) and B: [A, A], [text, A copy, B],
    [B, A]."""
    a, text, _, a_copy = _sequences()
    other = image_text_inputs(3)
    b = _sequence(other["input_ids"][0], ImageInputs(other["pixel_values"], other["image_grid_thw"]))
    return [pack_sequences(group, share_images=True) for group in ([a, a], [text, a_copy, b], [b, a])]


def test_step_images_encode_each_image_once_per_step_with_unchanged_outputs_and_gradients(runtime, dense_dir) -> None:
    from prism_mcore.data.batching import step_image_count
    from prism_mcore.models import step_images

    policy = build_policy(FP32_SDPA, ParallelConfig(), path=dense_dir)
    model = policy.chunks[0]
    batches = _step_microbatches()
    assert [b.num_images for b in batches] == [2, 4, 4]  # per micro-batch: A's two images, A and B, B and A
    assert step_image_count(batches) == 4  # A's two images and B's two, once each

    def run(flush: bool | None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], int]:
        """Forward and backward of every micro-batch, gradients accumulated; `flush` None: no step cache."""
        model.zero_grad()
        outputs, encoded = [], 0
        with step_images([model]) if flush is not None else torch.enable_grad() as images:
            for batch in batches:
                targets, valid = batch.next_token_targets()
                logprobs, _ = model(
                    **forward_kwargs(batch),
                    output_processor=logprobs_output_processor,
                    output_processor_context=LogProbRequest(targets),
                )
                (logprobs * valid).sum().backward()
                outputs.append(logprobs.detach())
            if flush:
                images.backward()
            if flush is not None:
                encoded = images.encoded_images
        return outputs, _grads(model), encoded

    ref_outputs, ref_grads, _ = run(None)
    outputs, grads, encoded = run(True)
    assert encoded == 4
    for output, ref in zip(outputs, ref_outputs, strict=True):
        torch.testing.assert_close(output, ref, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys() and any(name.startswith("vision_model") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # Without the tower's backward, the vision weights miss every gradient of the reused encodings.
    _, unflushed, _ = run(False)
    assert not any(name.startswith("vision_model") for name in unflushed)
