"""The pure parts the stages are built from: data order by step, data-parallel shares, the rollout engine's memory
around training, packed-to-rows views, the RL micro-batch targets, the policy-loss fraction the train step divides,
and the report table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prism_mcore.algorithms import policy_loss_preset
from prism_mcore.data.batching import batch_for_step, pack_token_ids
from prism_mcore.data.samples import TokenSequence
from prism_mcore.report import comparison, stage_table
from prism_mcore.stages.evaluation import periodic_validation
from prism_mcore.stages.rollouts import awake
from prism_mcore.training.forward import _padded, policy_loss_fraction, sequence_rows, token_batch
from prism_mcore.training.sharding import dp_share, or_filler
from prism_mcore.training.step import Filler


def test_batch_for_step_is_a_resumable_function_of_the_step() -> None:
    items = list(range(10))
    epoch0 = batch_for_step(items, 0, 4, seed=3) + batch_for_step(items, 1, 4, seed=3)
    wrapped = batch_for_step(items, 2, 4, seed=3)  # 2 items left in epoch 0, then 2 of epoch 1
    assert len(set(epoch0)) == 8 and set(epoch0) <= set(items)
    assert set(wrapped[:2]) == set(items) - set(epoch0)
    assert batch_for_step(items, 2, 4, seed=3) == wrapped  # same step, same batch (resume needs no loader state)
    assert batch_for_step(items, 0, 4, seed=4) != batch_for_step(items, 0, 4, seed=3)


def _ranks(dp: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(dp=dp, dp_rank=rank) for rank in range(dp)]


def test_data_parallel_shares_are_contiguous_and_cover_the_batch_once() -> None:
    items = list(range(10))
    shares = [dp_share(env, items) for env in _ranks(4)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]  # sizes differ by at most one, order kept
    assert [dp_share(env, items[:2]) for env in _ranks(4)] == [[0], [1], [], []]
    assert or_filler([], lambda: "first sample") == [Filler("first sample")]  # an empty share still runs
    assert or_filler(["a"], lambda: pytest.fail("not needed")) == ["a"]


class RecordingEngine:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def release_memory(self) -> None:
        self.calls.append("release")

    def resume_memory(self) -> None:
        self.calls.append("resume")


def test_an_offloading_engine_holds_memory_only_while_it_works() -> None:
    from prism_mcore.stages.context import RunContext

    def context(offload: bool) -> SimpleNamespace:
        config = SimpleNamespace(rollout=SimpleNamespace(offload_during_training=offload))
        released = RunContext.__dataclass_fields__["released_engines"].default_factory()
        return SimpleNamespace(config=config, released_engines=released)

    ctx, engine = context(offload=True), RecordingEngine()
    for work in ("generate", "sync", "generate", "generate"):
        with awake(ctx, engine, release_after=work != "sync"):
            engine.calls.append(work)
    # A fresh engine holds its memory: no resume before its first use; released after each generation, kept from
    # a weight sync to the generation that follows it.
    assert engine.calls == [
        *("generate", "release"),
        *("resume", "sync", "generate", "release"),
        *("resume", "generate", "release"),
    ]
    ctx, engine = context(offload=False), RecordingEngine()
    with awake(ctx, engine):
        engine.calls.append("generate")
    assert engine.calls == ["generate"]


def test_validation_runs_every_n_steps_only() -> None:
    assert periodic_validation(SimpleNamespace(), None, step=0, every=0) == {}
    assert periodic_validation(SimpleNamespace(), None, step=2, every=2) == {}  # after step 3 of every 2: no


def test_sequence_rows_gathers_each_sequences_masked_positions() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    mask = torch.tensor([[False, True, True, False, False, True, False]])
    rows, row_mask = sequence_rows(values, mask, torch.tensor([0, 4, 7], dtype=torch.int32))
    assert rows.tolist() == [[2.0, 3.0], [6.0, 0.0]]
    assert row_mask.tolist() == [[True, True], [True, False]]


def test_token_batch_places_advantages_and_rollout_logprobs_on_predicting_positions() -> None:
    # Two sequences: prompt [5, 6] + response [7, 8], and prompt [9] + response [10].
    packed = pack_token_ids([torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10])])
    packed.labels = torch.tensor([[-100, -100, 7, 8, -100, 10]])
    batch = token_batch(packed, advantages=[0.5, -1.0], rollout_logprobs=[[-0.1, -0.2], [-0.3]])
    # Position t predicts token t+1 of the same sequence: 7 is predicted at 1, 8 at 2, 10 at 4.
    assert batch.loss_mask.tolist() == [[False, True, True, False, True, False]]
    assert batch.targets[0, [1, 2, 4]].tolist() == [7, 8, 10]
    assert batch.advantages.tolist() == [[0.0, 0.5, 0.5, 0.0, -1.0, 0.0]]
    torch.testing.assert_close(batch.rollout_logprobs, torch.tensor([[0.0, -0.1, -0.2, 0.0, -0.3, 0.0]]))
    with pytest.raises(ValueError, match="sequence 1: 2 rollout log-probs for 1 tokens"):
        token_batch(packed, advantages=[0.5, -1.0], rollout_logprobs=[[-0.1, -0.2], [-0.3, -0.4]])


def test_a_token_batch_is_padded_for_sequence_parallelism_without_changing_its_loss() -> None:
    packed = pack_token_ids([torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11])])
    packed.labels = torch.tensor([[-100, -100, 7, 8, -100, 10, 11]])
    batch = token_batch(packed, advantages=[0.5, -1.0], rollout_logprobs=[[-0.1, -0.2], [-0.3, -0.4]])
    layout = SimpleNamespace(  # TP=2 with sequence parallelism; token 0 is the image token, so 1 pads
        tensor_model_parallel_size=2, sequence_parallel=True, fp8=None, image_token_id=0, vision_start_token_id=2
    )
    padded = _padded(batch, layout)
    assert padded.packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 1]]
    assert padded.loss_mask.tolist() == [batch.loss_mask[0].tolist() + [False]]
    assert padded.advantages.tolist() == [batch.advantages[0].tolist() + [0.0]]
    assert padded.rollout_logprobs.tolist() == [batch.rollout_logprobs[0].tolist() + [0.0]]
    assert padded.targets.tolist() == [batch.targets[0].tolist() + [0]]
    # The policy loss reads the same rows from the padded batch.
    logprobs = -torch.rand(1, 8)
    for name in ("loss_mask", "advantages"):
        rows, mask = sequence_rows(getattr(padded, name), padded.loss_mask, padded.packed.cu_seqlens)
        expected, expected_mask = sequence_rows(getattr(batch, name), batch.loss_mask, batch.packed.cu_seqlens)
        assert torch.equal(rows, expected) and torch.equal(mask, expected_mask)
    rows, _ = sequence_rows(logprobs, padded.loss_mask, padded.packed.cu_seqlens)
    expected, _ = sequence_rows(logprobs[:, :7], batch.loss_mask, batch.packed.cu_seqlens)
    assert torch.equal(rows, expected)
    # FP8 wants 16 tokens; without sequence parallelism or FP8 nothing changes.
    assert _padded(batch, SimpleNamespace(**{**vars(layout), "fp8": "hybrid"})).packed.num_tokens == 16
    assert _padded(batch, SimpleNamespace(**{**vars(layout), "sequence_parallel": False})) is batch


def test_policy_loss_fraction_weights_microbatches_as_the_reference() -> None:
    log_probs = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-2.0, 0.0, 0.0]])
    # At ratio 1 every token's loss is -A: tokens [-1, -1, -1, 2]; token-mean = -1/4 over the micro-batch.
    numerator, denominator, _ = policy_loss_fraction(log_probs, advantages, mask, policy_loss_preset("grpo"))
    assert numerator.item() == pytest.approx(-0.25 * 2) and int(denominator) == 2  # (mean · sequences, sequences)
    numerator, denominator, _ = policy_loss_fraction(
        log_probs, advantages, mask, policy_loss_preset("grpo", aggregation="global-token-mean")
    )
    assert numerator.item() == pytest.approx(-1.0) and int(denominator) == 4  # (token sum, tokens)
    numerator.backward()
    torch.testing.assert_close(log_probs.grad, -advantages * mask)  # d(-A·r)/d logp = -A at r = 1


def test_stage_table_and_comparison(tmp_path) -> None:
    evaluation = {"val": {"accuracy": 0.25, "format_valid": 0.5}, "test": {"accuracy": 0.125, "format_valid": 1.0}}
    summary = {
        "stages": {
            "sft": {"eval": evaluation},
            "warmup": {"heldout_accuracy_before": 0.5, "heldout_accuracy": 0.75},
        }
    }
    table = stage_table(summary).splitlines()
    assert table[2].split("|")[1:5] == ["   0.250 ", "   0.500 ", "    0.125 ", "    1.000 "]
    assert "D held-out pairwise acc 0.500 -> 0.750" in table[3]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(__import__("json").dumps(summary))
    rows = comparison(tmp_path / "a", tmp_path / "b").splitlines()
    assert rows[2].startswith("SFT -> RLVR") and rows[3].startswith("SFT -> PRISM -> RLVR")
    assert rows[3].split("|")[2].strip() == "0.125"


class SegmentBuilder:
    """Student segments of 3 + 4 tokens, teacher segments of 5 + 5 tokens (what `SampleBuilder` would cut)."""

    @staticmethod
    def _sequence(length: int) -> TokenSequence:
        return TokenSequence(torch.arange(length), torch.arange(length).expand(3, length), score_index=length - 1)

    def student_segments(self, sample: SimpleNamespace) -> tuple[TokenSequence, TokenSequence]:
        return self._sequence(3), self._sequence(4)

    def teacher_segments(self, sample: SimpleNamespace) -> tuple[TokenSequence, TokenSequence]:
        return self._sequence(5), self._sequence(5)


def test_discriminator_microbatches_share_teachers_and_count_valid_samples_per_microbatch() -> None:
    from prism_mcore.training.sharding import discriminator_microbatches

    builder, env = SegmentBuilder(), SimpleNamespace(dp=1, dp_rank=0)
    samples = [
        SimpleNamespace(uid=uid, format_valid=valid)
        for uid, valid in (("a", True), ("a", False), ("a", True), ("b", True), ("b", True))
    ]
    # A sample costs 7 tokens, plus 10 for its prompt's teacher when the micro-batch has none yet: budget 30 takes
    # a1+a2 (24), a3 (17: a1+a2+a3 would be 31), b1+b2 (24).
    batches = discriminator_microbatches(builder, env, samples, budget=30)
    assert [b.valid.tolist() for b in batches] == [[True, False], [True], [True, True]]
    assert [b.num_prompts for b in batches] == [1, 1, 1]
    assert [b.packed.num_sequences for b in batches] == [6, 4, 6]  # 2 segments per student, 2 per teacher
    assert [b.packed.num_tokens for b in batches] == [24, 17, 24]
    assert [b.num_valid_global for b in batches] == [1, 1, 2]  # N_v of each micro-batch (one rank)
    # A budget below one sample's 17 tokens: each sample alone, none dropped.
    alone = discriminator_microbatches(builder, env, samples, budget=10)
    assert [b.valid.numel() for b in alone] == [1] * 5 and [b.packed.num_tokens for b in alone] == [17] * 5
    # Two prompts in one micro-batch: each student points at its own prompt's teacher pair.
    both = discriminator_microbatches(builder, env, samples, budget=100)
    assert len(both) == 1 and both[0].num_prompts == 2 and both[0].teacher_index.tolist() == [0, 0, 0, 1, 1]
