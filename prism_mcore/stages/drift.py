"""The drift report: how far the policy is from the supervision it was meant to match, per segment (PRISM_SPEC §1:
the caption is perception, the CoT reasoning), on the validation split at every evaluation.

- `response_drift` (from an evaluation's greedy responses, rank 0): caption faithfulness (precision, recall, F1 and
  exact share of stated facts, `rewards.caption_check`), answer accuracy when the caption is exact vs not, and style
  against the teacher (caption tokens and bullets, CoT tokens; format validity is the evaluation's `format_valid`);
- `teacher_nll` (every rank, collective): the per-token negative log-likelihood of the teacher's caption and of its
  CoT under the policy, teacher-forced after the prompt (global token means over the split);
- `discriminator_gap` (every rank, collective): the discriminator's mean score of the teacher's segment minus the
  policy's, caption and CoT, on the validation responses (format-valid ones, raw scores before the ±10 clip).
Before a discriminator exists (the SFT stage) the gap is absent; alignment measures it with the D it is training,
RLVR with the latest D a stage of this run exported (`latest_discriminator`), none in an SFT -> RLVR run.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from prism_mcore.algorithms import perception_drift
from prism_mcore.config.schema import STAGES
from prism_mcore.data.samples import SegmentPair
from prism_mcore.record import Sample
from prism_mcore.rewards.caption_check import caption_bullets, caption_text, check_caption
from prism_mcore.runtime import broadcast_from_main
from prism_mcore.stages.context import DISCRIMINATOR_HF, RunContext
from prism_mcore.training.forward import sft_forward, warmup_forward
from prism_mcore.training.resume import read_stage_done
from prism_mcore.training.sharding import pair_microbatches, sft_microbatches, token_budget
from prism_mcore.training.step import forward_metrics

NAN = float("nan")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else NAN


def response_drift(samples: list[Sample], encode: Any) -> dict[str, float]:
    """Perception and style figures of an evaluation's scored responses; `encode` is the tokenizer's text -> ids."""
    checks = [(sample, check_caption(sample)) for sample in samples]
    checked = [(sample, check) for sample, check in checks if check is not None]
    result = {"caption_checked": len(checked) / len(samples) if samples else NAN}
    counts = torch.tensor([[c.stated, c.correct, c.true] for _, c in checked], dtype=torch.float64).reshape(-1, 3)
    accuracy = torch.tensor([s.accuracy for s, _ in checked], dtype=torch.float64)
    result.update(perception_drift(counts[:, 0], counts[:, 1], counts[:, 2], accuracy))
    valid = [sample for sample in samples if sample.format_valid]
    result["caption_tokens"] = _mean([s.segments.caption_end for s in valid])
    result["caption_bullets"] = _mean([len(caption_bullets(caption_text(s.response_text) or "")) for s in valid])
    result["cot_tokens"] = _mean([s.segments.valid_length - s.segments.caption_end for s in valid])
    teachers = [s for s in samples if s.teacher_caption and s.teacher_cot]
    result["teacher_caption_tokens"] = _mean([len(encode(s.teacher_caption.rstrip())) for s in teachers])
    result["teacher_caption_bullets"] = _mean(
        [len(caption_bullets(caption_text(s.teacher_caption) or s.teacher_caption)) for s in teachers]
    )
    # The policy's CoT segment runs from just after `</caption>` through EOS: the newline before `<think>` and EOS.
    result["teacher_cot_tokens"] = _mean([len(encode("\n" + s.teacher_cot)) + 1 for s in teachers])
    return result


def teacher_nll(ctx: RunContext, policy: Any) -> dict[str, float]:
    """`teacher_caption_nll` and `teacher_cot_nll` of the validation prompts (loaded by the evaluation that comes
    first) that carry teacher texts, under the policy (a `ModelHandle`, in eval mode for the pass); {} when none
    does."""
    samples = [s for s in ctx.eval_prompts["val"][:] if s.teacher_caption and s.teacher_cot]
    if not samples:
        return {}
    pairs = [ctx.builder.teacher_response_sequences(sample) for sample in samples]
    was_training = policy.chunks[0].training
    policy.eval()
    try:
        return {
            f"teacher_{kind}_nll": forward_metrics(
                policy.chunks, sft_forward, sft_microbatches(ctx.env, sequences, token_budget(ctx.config.data))
            )["loss"]
            for kind, sequences in (("caption", [c for c, _ in pairs]), ("cot", [t for _, t in pairs]))
        }
    finally:
        policy.train(was_training)


def discriminator_gap(ctx: RunContext, discriminator: Any, samples: list[Sample] | None) -> dict[str, float]:
    """`d_gap_caption` and `d_gap_cot`: D's teacher-minus-policy score on rank 0's validation `samples` (shared
    here), format-valid ones with teacher texts; NaN when there are none. `discriminator` is a `ModelHandle`."""
    samples = [s for s in broadcast_from_main(samples) or [] if s.format_valid and s.teacher_caption and s.teacher_cot]
    if not samples:
        return {"d_gap_caption": NAN, "d_gap_cot": NAN}
    loss_step = warmup_forward(0.0, top_k=discriminator.config.moe_router_topk)
    result = {}
    was_training = discriminator.chunks[0].training
    discriminator.eval()
    try:
        for position, kind in enumerate(("caption", "cot")):
            pairs = [
                SegmentPair(kind, ctx.builder.teacher_segments(s)[position], ctx.builder.student_segments(s)[position])
                for s in samples
            ]
            result[f"d_gap_{kind}"] = forward_metrics(
                discriminator.chunks, loss_step, pair_microbatches(ctx.env, pairs, token_budget(ctx.config.data))
            )["margin"]
    finally:
        discriminator.train(was_training)
    return result


def latest_discriminator(ctx: RunContext, stage: str) -> tuple[str, str] | None:
    """The newest discriminator export of a stage before `stage` in this run, as (that stage, the export's path);
    None when no stage exported one."""
    for earlier in reversed(STAGES[: STAGES.index(stage)]):
        record = read_stage_done(ctx.run_dir, earlier)
        if record and DISCRIMINATOR_HF in record:
            return earlier, record[DISCRIMINATOR_HF]
    return None


def model_drift(ctx: RunContext, policy: Any, discriminator: Any | None = None) -> dict[str, float]:
    """The teacher NLL under `policy` and, with a `discriminator`, its score gap on the last validation responses."""
    result = teacher_nll(ctx, policy)
    if discriminator is not None:
        result.update(discriminator_gap(ctx, discriminator, ctx.eval_samples.get("val")))
    return result


def record_drift(
    ctx: RunContext, stage: str, record: dict[str, Any], policy: Any, discriminator: Any | None, which_d: str
) -> None:
    """Complete a finished stage's record with the drift report: the model-based figures added to its final `val`
    evaluation, `drift_discriminator` saying which D measured the gap (`which_d`), figures without a value as None
    (JSON null); the validation figures that have a value are also logged as `drift/*`, in a record of their own at
    the stage's last step."""
    record["eval"]["val"].update(model_drift(ctx, policy, discriminator))
    record["drift_discriminator"] = which_d
    for split in record["eval"].values():
        split.update({name: None for name, value in split.items() if isinstance(value, float) and math.isnan(value)})
    drift = {f"drift/{name}": value for name, value in record["eval"]["val"].items() if value is not None}
    ctx.metrics.log(
        stage, record["steps"], {name: value for name, value in drift.items() if name != "drift/num_prompts"}
    )
