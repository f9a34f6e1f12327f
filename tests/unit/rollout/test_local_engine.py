"""LocalEngine on the embedded default's Qwen3-VL policy: its rollout log-probs against a teacher-forced
recomputation (transformers, and the trainer's Megatron path), stop tokens, vision-token suppression, seeding, weight
updates from a stream (the Megatron export included) and the memory hooks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prism_mcore.config.schema import ModelConfig, ParallelConfig
from prism_mcore.data.embedded import EmbeddedAssets
from prism_mcore.record import Sample
from prism_mcore.rollout import LocalEngine, RolloutError, SamplingParams
from prism_mcore.rollout.local import SampledTokenLogProbs
from tests.rollout_support import perturbed_weights, teacher_forced_logprobs

LOGPROB_TOLERANCE = 1e-4  # fp32


@pytest.fixture
def engine(embedded: EmbeddedAssets) -> LocalEngine:
    return LocalEngine.from_pretrained(embedded.policy_path, max_batch_size=4)


def _max_logprob_error(engine: LocalEngine, samples: list[Sample], temperature: float) -> float:
    return max(
        (teacher_forced_logprobs(engine.model, s, temperature) - torch.tensor(s.rollout_logprobs)).abs().max().item()
        for s in samples
    )


def _check_finish_reasons(samples: list[Sample], stop_ids: set[int], max_new_tokens: int) -> None:
    """A response ends at its first stop token (kept, finish "stop") or at max_new_tokens (finish "length")."""
    for sample in samples:
        assert not stop_ids.intersection(sample.response_ids[:-1])
        if sample.finish_reason == "stop":
            assert sample.response_ids[-1] in stop_ids
        else:
            assert sample.finish_reason == "length" and len(sample.response_ids) == max_new_tokens


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=2, temperature=1.0, max_new_tokens=24, seed=0),
        SamplingParams(n=2, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=24, seed=1),
        SamplingParams(n=1, temperature=0.0, max_new_tokens=24),
    ],
    ids=["T1", "T0.7-topk-topp", "greedy"],
)
def test_logprobs_equal_teacher_forced_recomputation(
    engine: LocalEngine, prompts: list[Sample], params: SamplingParams
) -> None:
    # max_batch_size=4 splits the 4 x n rows into left-padded batches mixing image and text-only prompts.
    samples = engine.generate(prompts, params)
    rows = [prompt for prompt in prompts for _ in range(params.n)]  # the n copies of a prompt are adjacent
    assert [(s.uid, s.prompt_ids) for s in samples] == [(p.uid, p.prompt_ids) for p in rows]
    assert all(s.weight_version == 0 for s in samples)
    _check_finish_reasons(samples, set(engine.eos_token_ids), params.max_new_tokens)
    assert _max_logprob_error(engine, samples, params.logprob_temperature) <= LOGPROB_TOLERANCE


def test_greedy_decoding_picks_the_most_likely_token(engine: LocalEngine, prompts: list[Sample]) -> None:
    (sample,) = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=8))
    # Every greedy token is the argmax of its distribution, so its log-prob is the largest one: >= log(1/V).
    assert min(sample.rollout_logprobs) >= -torch.log(torch.tensor(float(engine.model.config.text_config.vocab_size)))
    again = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=8))
    assert again[0].response_ids == sample.response_ids


def test_generation_stops_at_stop_tokens_and_keeps_them(engine: LocalEngine, prompts: list[Sample]) -> None:
    vocab = engine.model.config.text_config.vocab_size
    stop = tuple(range(0, vocab, 3))  # a third of the vocabulary: every response stops within a few tokens
    samples = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=40, stop_token_ids=stop, seed=2))
    _check_finish_reasons(samples, set(stop) | set(engine.eos_token_ids), 40)
    assert all(s.finish_reason == "stop" for s in samples)
    assert len({len(s.response_ids) for s in samples}) > 1  # rows of one batch stop at different steps
    assert _max_logprob_error(engine, samples, 1.0) <= LOGPROB_TOLERANCE


def test_vision_tokens_are_suppressed_but_logprobs_cover_the_whole_vocabulary() -> None:
    recorder = SampledTokenLogProbs(temperature=2.0, suppress_token_ids=[1, 3])
    scores = torch.tensor([[0.0, 5.0, 1.0, 4.0], [2.0, 1.0, 0.0, 9.0]])
    processed = recorder(torch.tensor([[7], [7]]), scores.clone())
    assert torch.isinf(processed[:, [1, 3]]).all() and torch.equal(processed[:, [0, 2]], scores[:, [0, 2]])
    sampled = torch.tensor([[2], [0]])
    expected = torch.log_softmax(scores / 2.0, dim=-1).gather(-1, sampled)
    torch.testing.assert_close(recorder.sampled_logprobs(sampled), expected)


def test_a_near_uniform_policy_never_emits_vision_tokens(engine: LocalEngine, prompts: list[Sample]) -> None:
    vision = set(engine.suppress_token_ids)
    assert len(vision) == 4  # <|image_pad|>, <|video_pad|>, <|vision_start|>, <|vision_end|>
    # At temperature 100 every token is about equally likely: 1024 draws hit a vision id ~6 times without suppression.
    params = SamplingParams(n=16, temperature=100.0, max_new_tokens=64, seed=3)
    unsuppressed = LocalEngine(
        engine.model, eos_token_ids=[-1], pad_token_id=engine.pad_token_id, suppress_token_ids=[]
    )
    assert any(vision.intersection(s.response_ids) for s in unsuppressed.generate(prompts[-1:], params))
    samples = LocalEngine(engine.model, eos_token_ids=[-1], pad_token_id=engine.pad_token_id).generate(
        prompts[-1:], params
    )
    assert not any(vision.intersection(s.response_ids) for s in samples)


def test_seeded_generation_is_reproducible(engine: LocalEngine, prompts: list[Sample]) -> None:
    params = SamplingParams(n=2, max_new_tokens=16, seed=11)
    first = engine.generate(prompts, params)
    assert [s.response_ids for s in engine.generate(prompts, params)] == [s.response_ids for s in first]
    other = engine.generate(prompts, dataclasses.replace(params, seed=12))
    assert [s.response_ids for s in other] != [s.response_ids for s in first]
    assert first[0].response_ids != first[1].response_ids  # the n samples of a prompt differ


def test_unseeded_generation_draws_from_the_process_generator(engine: LocalEngine, prompts: list[Sample]) -> None:
    params = SamplingParams(n=1, max_new_tokens=16)
    torch.manual_seed(3)
    first = [s.response_ids for s in engine.generate(prompts, params)]
    assert [s.response_ids for s in engine.generate(prompts, params)] != first  # a second call, other samples
    torch.manual_seed(3)
    assert [s.response_ids for s in engine.generate(prompts, params)] == first


def test_update_weights_loads_in_place_and_bumps_the_version(engine: LocalEngine, prompts: list[Sample]) -> None:
    params = SamplingParams(n=1, max_new_tokens=16, seed=5)
    before = engine.generate(prompts, params)
    new_weights = perturbed_weights(engine.model, seed=0)
    engine.update_weights(iter(new_weights), version=3)
    state = engine.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in new_weights)
    after = engine.generate(prompts, params)
    assert engine.weight_version == 3 and all(s.weight_version == 3 for s in after)
    assert [s.response_ids for s in after] != [s.response_ids for s in before]
    assert _max_logprob_error(engine, after, 1.0) <= LOGPROB_TOLERANCE


def test_update_weights_rejects_unknown_names_and_shapes(engine: LocalEngine) -> None:
    with pytest.raises(KeyError, match="model.language_model.nonexistent.weight"):
        engine.load_weights([("model.language_model.nonexistent.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"lm_head.weight.*shape \(3, 3\)"):
        engine.load_weights([("lm_head.weight", torch.zeros(3, 3))])
    assert engine.weight_version == 0


def test_memory_release_blocks_generation_until_resumed(engine: LocalEngine, prompts: list[Sample]) -> None:
    engine.release_memory()
    with pytest.raises(RolloutError, match="resume_memory"):
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))
    engine.resume_memory()
    assert len(engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))[0].response_ids) == 2


def test_prompts_with_image_tokens_need_image_inputs(engine: LocalEngine, prompts: list[Sample]) -> None:
    without_images = dataclasses.replace(prompts[0], image_inputs=None)
    with pytest.raises(RolloutError, match="no image_inputs"):
        engine.generate([without_images], SamplingParams(max_new_tokens=2))


@pytest.mark.gpu
def test_engine_on_cuda_matches_teacher_forcing_and_offloads(embedded: EmbeddedAssets, prompts: list[Sample]) -> None:
    engine = LocalEngine.from_pretrained(embedded.policy_path, device="cuda")
    samples = engine.generate(prompts, SamplingParams(n=2, temperature=0.7, max_new_tokens=24, seed=0))
    # Padded-batch and single-sequence GPU kernels round differently in fp32: a looser bound than on CPU.
    assert _max_logprob_error(engine, samples, 0.7) <= 1e-3
    engine.release_memory()
    assert next(engine.model.parameters()).device.type == "cpu"
    engine.resume_memory()
    assert next(engine.model.parameters()).device.type == "cuda"
    assert len(engine.generate(prompts[:1], SamplingParams(max_new_tokens=4))[0].response_ids) == 4


def test_megatron_export_feeds_the_engine_and_trainer_logprobs_match(
    embedded: EmbeddedAssets, prompts: list[Sample]
) -> None:
    """The trainer's side: the Megatron policy streams its weights into a LocalEngine holding other weights, and
    the trainer's log-probs of the rollouts equal the engine's."""
    from prism_mcore.data.batching import pack_token_ids
    from prism_mcore.models import build_policy, forward_kwargs, iter_hf_weights
    from prism_mcore.runtime import init_distributed
    from prism_mcore.training.logprobs import LogProbRequest, logprobs_output_processor

    init_distributed(ParallelConfig(), seed=0)
    policy = build_policy(
        ModelConfig(dtype="float32", attention_backend="sdpa"), ParallelConfig(), path=embedded.policy_path
    )
    engine = LocalEngine.from_pretrained(embedded.policy_path)
    reference = {name: tensor.clone() for name, tensor in engine.model.state_dict().items()}
    engine.load_weights(perturbed_weights(engine.model, seed=1))

    engine.update_weights(iter_hf_weights(policy.eval()), version=1)
    state = engine.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in reference.items())

    temperature = 0.7
    samples = engine.generate(prompts, SamplingParams(n=2, temperature=temperature, max_new_tokens=24, seed=4))
    batch = pack_token_ids(
        [torch.tensor(s.prompt_ids + s.response_ids) for s in samples], [s.image_inputs for s in samples]
    )
    targets, _ = batch.next_token_targets()
    with torch.no_grad():
        logprobs, _ = policy.chunks[0](
            **forward_kwargs(batch),
            output_processor=logprobs_output_processor,
            output_processor_context=LogProbRequest(targets, temperature=temperature),
        )
    ends = batch.cu_seqlens[1:].tolist()
    trainer = [
        logprobs[0, end - 1 - len(s.response_ids) : end - 1] for s, end in zip(samples, ends, strict=True)
    ]  # position t scores token t+1: the response's log-probs sit one position before each response token
    error = max(
        (t - torch.tensor(s.rollout_logprobs)).abs().max().item() for t, s in zip(trainer, samples, strict=True)
    )
    assert error <= LOGPROB_TOLERANCE
