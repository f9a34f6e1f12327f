"""Sample building against references: transformers' Qwen3-VL processor (ids, image tokens, pixel values) and
`Qwen3VLModel.get_rope_index` (3-D positions), and hand-derived masks, segments and limits."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import pytest
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, Qwen3VLForConditionalGeneration

from prism_mcore.data.embedded.build import EmbeddedAssets
from prism_mcore.data.embedded.processor import load_processor
from prism_mcore.data.errors import TOO_LONG, DataError, DataStats, checked
from prism_mcore.data.prompts import SYSTEM_PROMPT
from prism_mcore.data.readers import (
    ChatMessage,
    PromptRecord,
    RowOrigin,
    SftExample,
    WarmupExample,
    WarmupPair,
    open_prompts,
    open_sft,
    open_warmup,
)
from prism_mcore.data.samples import IGNORE_INDEX, LengthLimits, SampleBuilder, mrope_position_ids
from prism_mcore.record import SegmentBounds

ORIGIN = RowOrigin("test.jsonl", 0)
CAPTION = "<caption>\n- two circles\n</caption>"
COT = "<think>\n1 + 1 = 2\n</think>\n<answer>\n2\n</answer>"


def record(images: list[bytes], question: str = "<image>\nHow many?\n", **fields: str) -> PromptRecord:
    return PromptRecord(ORIGIN, [ChatMessage("user", question)], images, ground_truth="2", **fields)  # type: ignore[arg-type]


def hf_rope_index(model: Qwen3VLForConditionalGeneration, ids: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
    image_token_id = model.config.image_token_id
    mm_token_type_ids = (ids == image_token_id).int().unsqueeze(0)
    positions, _ = model.model.get_rope_index(
        ids.unsqueeze(0), mm_token_type_ids=mm_token_type_ids, image_grid_thw=grid
    )
    return positions[:, 0]


def test_prompt_equals_qwen3vl_processor_output(
    builder: SampleBuilder, embedded: EmbeddedAssets, make_image: Callable[..., bytes]
) -> None:
    """Two images of different sizes: prompt ids (image tokens expanded), pixel values and grids are what
    transformers' Qwen3-VL processor makes of the same rendered chat and images."""
    images = [make_image(96, 64, seed=1), make_image(64, 128, seed=2)]
    sample = builder.prompt_sample(record(images, "<image>\nLeft picture.\n<image>\nHow many circles in all?\n"))
    processor = load_processor(embedded.processor_path)
    text = builder.render(
        builder.with_system_prompt(
            [ChatMessage("user", "<image>\nLeft picture.\n<image>\nHow many circles in all?\n")]
        ),
        add_generation_prompt=True,
    )
    reference = processor(text=[text], images=[Image.open(io.BytesIO(data)) for data in images], return_tensors="pt")
    assert sample.prompt_ids == reference["input_ids"][0].tolist()
    assert sample.image_inputs is not None
    torch.testing.assert_close(sample.image_inputs.pixel_values, reference["pixel_values"])
    assert sample.image_inputs.image_grid_thw.tolist() == reference["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 4]]
    # 4*6/4 + 8*4/4 = 6 + 8 image tokens.
    assert sample.prompt_ids.count(builder.image_token_id) == 14
    assert builder.tokenizer.decode(sample.prompt_ids[:3]) == "<|im_start|>system\n"
    assert builder.tokenizer.decode(sample.prompt_ids).count(SYSTEM_PROMPT) == 1
    assert builder.tokenizer.decode(sample.prompt_ids[-3:]) == "<|im_start|>assistant\n"


def test_prompt_keeps_its_own_system_turn(builder: SampleBuilder, make_image: Callable[..., bytes]) -> None:
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "<image>Q")]
    sample = builder.prompt_sample(PromptRecord(ORIGIN, messages, [make_image(64, 64)], ground_truth="1"))
    text = builder.tokenizer.decode(sample.prompt_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and SYSTEM_PROMPT not in text


@pytest.mark.parametrize("with_images", [False, True])
def test_mrope_positions_equal_transformers_get_rope_index(
    builder: SampleBuilder,
    tiny_policy: Qwen3VLForConditionalGeneration,
    make_image: Callable[..., bytes],
    with_images: bool,
) -> None:
    if with_images:
        question = "<image>\nLeft.\n<image>\nWhich is larger?\n"
        images = [make_image(96, 64, seed=1), make_image(128, 128, seed=2)]  # grids 4x6 and 8x8 (merged 2x3, 4x4)
    else:
        question, images = "Which is larger, 3 or 5?\n", []
    sample = builder.prompt_sample(record(images, question))
    ids = torch.tensor(sample.prompt_ids)
    grid = None if sample.image_inputs is None else sample.image_inputs.image_grid_thw
    positions = mrope_position_ids(ids, grid, builder.image_token_id, spatial_merge_size=2)
    torch.testing.assert_close(positions, hf_rope_index(tiny_policy, ids, grid), rtol=0, atol=0)
    if with_images:
        # Hand check of the first image: it starts at position p = its index; rows t=p, h=p+row, w=p+column on the
        # 2x3 merged grid; the text after it resumes at p + max(2, 3).
        start = sample.prompt_ids.index(builder.image_token_id)
        image = positions[:, start : start + 6]
        assert image.tolist() == [
            [start] * 6,
            [start, start, start, start + 1, start + 1, start + 1],
            [start, start + 1, start + 2, start, start + 1, start + 2],
        ]
        assert positions[:, start + 6].tolist() == [start + 3] * 3


def test_sft_labels_cover_assistant_turns_only(
    builder: SampleBuilder, embedded: EmbeddedAssets, make_image: Callable[..., bytes]
) -> None:
    """Two turns: labels are exactly each answer and its `<|im_end|>`; ids equal the processor's."""
    messages = [
        ChatMessage("user", "<image>\nHow many circles?\n"),
        ChatMessage("assistant", f"{CAPTION}\n{COT}"),
        ChatMessage("user", "And squares?"),
        ChatMessage("assistant", "None."),
    ]
    image = make_image(64, 64)
    sequence = builder.sft_sequence(SftExample(ORIGIN, messages, [image]))
    assert sequence.labels is not None
    tokenizer = builder.tokenizer
    targets = sequence.labels != IGNORE_INDEX
    assert torch.equal(sequence.labels[targets], sequence.input_ids[targets])
    # The targets form two runs, one per assistant turn.
    starts = [i for i in range(len(sequence)) if targets[i] and (i == 0 or not targets[i - 1])]
    ends = [i for i in range(len(sequence)) if targets[i] and (i + 1 == len(sequence) or not targets[i + 1])]
    runs = [tokenizer.decode(sequence.input_ids[s : e + 1]) for s, e in zip(starts, ends, strict=True)]
    assert runs == [f"{CAPTION}\n{COT}<|im_end|>", "None.<|im_end|>"]
    assert tokenizer.decode(sequence.input_ids[starts[0] - 3 : starts[0]]) == "<|im_start|>assistant\n"
    assert tokenizer.decode(sequence.input_ids[ends[-1] + 1 :]) == "\n"  # context only: never generated
    text = builder.render(builder.with_system_prompt(messages), add_generation_prompt=False)
    reference = load_processor(embedded.processor_path)(text=[text], images=[Image.open(io.BytesIO(image))])
    assert sequence.input_ids.tolist() == reference["input_ids"][0]


def test_teacher_segments_are_scored_at_caption_end_and_im_end(
    builder: SampleBuilder, make_image: Callable[..., bytes]
) -> None:
    sample = builder.prompt_sample(record([make_image(64, 64)], teacher_caption=CAPTION + "\n", teacher_cot=COT))
    caption, cot = builder.teacher_segments(sample)
    prompt_length = len(sample.prompt_ids)
    tokenizer = builder.tokenizer
    # The trailing newline of the caption is dropped, so the scored token is `</caption>` itself.
    assert caption.input_ids[:prompt_length].tolist() == sample.prompt_ids
    assert caption.input_ids[prompt_length:].tolist() == tokenizer.encode(CAPTION, add_special_tokens=False)
    assert caption.score_index == len(caption) - 1
    assert caption.input_ids[caption.score_index].item() == tokenizer.convert_tokens_to_ids("</caption>")
    assert cot.input_ids[prompt_length:].tolist() == tokenizer.encode(COT, add_special_tokens=False) + [builder.eos_id]
    assert cot.score_index == len(cot) - 1 and cot.input_ids[-1].item() == builder.eos_id
    # The segment continues the prompt's positions: its text follows the last prompt position by one.
    prompt_positions = mrope_position_ids(
        sample.prompt_ids, sample.image_inputs.image_grid_thw, builder.image_token_id, 2
    )
    torch.testing.assert_close(cot.position_ids[:, :prompt_length], prompt_positions)
    assert cot.position_ids[:, prompt_length].tolist() == [prompt_positions[0, -1].item() + 1] * 3
    assert caption.image_inputs is sample.image_inputs and cot.labels is None


def test_teacher_segments_truncate_to_max_segment_length_keeping_im_end(
    tokenizer: PreTrainedTokenizerBase, builder: SampleBuilder, make_image: Callable[..., bytes]
) -> None:
    limits = LengthLimits(max_segment_length=8, over_length="truncate")
    truncating = SampleBuilder(tokenizer, builder.images, limits)
    sample = truncating.prompt_sample(record([make_image(64, 64)], teacher_caption=CAPTION, teacher_cot=COT))
    assert truncating.stats.truncated == 2
    caption, cot = truncating.teacher_segments(sample)
    prompt_length = len(sample.prompt_ids)
    assert caption.input_ids[prompt_length:].tolist() == tokenizer.encode(CAPTION, add_special_tokens=False)[:8]
    assert cot.input_ids[prompt_length:].tolist() == tokenizer.encode(COT, add_special_tokens=False)[:7] + [
        truncating.eos_id
    ]
    filtering = SampleBuilder(tokenizer, builder.images, LengthLimits(max_segment_length=8))
    with pytest.raises(DataError) as raised:
        filtering.prompt_sample(record([make_image(64, 64)], teacher_caption=CAPTION, teacher_cot=COT))
    assert (raised.value.reason, raised.value.field, raised.value.file) == (TOO_LONG, "teacher_caption", "test.jsonl")
    # RL and evaluation prompts never use teacher texts: they are dropped, not length-checked.
    rl_prompt = filtering.prompt_sample(
        record([make_image(64, 64)], teacher_caption=CAPTION, teacher_cot=COT), with_teacher=False
    )
    assert (rl_prompt.teacher_caption, rl_prompt.teacher_cot) == (None, None)


def test_student_segments_and_policy_sequence_follow_segment_bounds(
    builder: SampleBuilder, make_image: Callable[..., bytes]
) -> None:
    sample = builder.prompt_sample(record([make_image(64, 64)]))
    tokenizer = builder.tokenizer
    caption_ids = tokenizer.encode(CAPTION, add_special_tokens=False)
    cot_ids = tokenizer.encode("\n" + COT, add_special_tokens=False) + [builder.eos_id]
    sample.response_ids = caption_ids + cot_ids
    sample.segments = SegmentBounds(
        caption_end=len(caption_ids), valid_length=len(sample.response_ids), format_valid=True
    )
    caption, cot = builder.student_segments(sample)
    prompt_length = len(sample.prompt_ids)
    assert caption.input_ids[prompt_length:].tolist() == caption_ids
    assert cot.input_ids[prompt_length:].tolist() == cot_ids  # without the caption in context (PRISM_SPEC §2.3)
    assert (caption.score_index, cot.score_index) == (len(caption) - 1, len(cot) - 1)

    policy = builder.policy_sequence(sample)
    assert policy.input_ids.tolist() == sample.prompt_ids + sample.response_ids
    assert policy.labels is not None
    assert policy.labels.tolist() == [IGNORE_INDEX] * prompt_length + sample.response_ids

    # An invalid response whose fallback split leaves no CoT token still gets one token to score: the EOS.
    sample.segments = SegmentBounds(caption_end=1, valid_length=1, format_valid=False)
    _, empty_cot = builder.student_segments(sample)
    assert empty_cot.input_ids[prompt_length:].tolist() == [builder.eos_id]


def test_warmup_pairs_share_the_prompt_and_score_like_alignment(
    builder: SampleBuilder, make_image: Callable[..., bytes]
) -> None:
    pairs = [
        WarmupPair("caption", CAPTION, "<caption>\n- one circle\n</caption>"),
        WarmupPair("cot", COT, "<think>\n1\n</think>\n<answer>\n1\n</answer>"),
    ]
    example = WarmupExample(ORIGIN, "How many circles?", make_image(64, 64), pairs)
    caption_pair, cot_pair = builder.warmup_pairs(example)
    # The warmup prompt is [system, user=[image, prompt]], as an alignment prompt without the placeholder newline.
    prompt = builder.prompt_sample(record([make_image(64, 64)], "<image>How many circles?"))
    prompt_length = len(prompt.prompt_ids)
    for pair in (caption_pair, cot_pair):
        assert pair.teacher.input_ids[:prompt_length].tolist() == prompt.prompt_ids
        assert pair.student.input_ids[:prompt_length].tolist() == prompt.prompt_ids
    assert caption_pair.teacher.input_ids[-1].item() == builder.tokenizer.convert_tokens_to_ids("</caption>")
    assert cot_pair.student.input_ids[-1].item() == builder.eos_id
    assert (caption_pair.kind, cot_pair.kind) == ("caption", "cot")


def test_the_embedded_default_files_build_without_errors(builder: SampleBuilder, embedded: EmbeddedAssets) -> None:
    """The first rows of every embedded file go through reader and builder under `on_error="raise"`."""
    sft = open_sft(embedded.data_dir, dataset=next(iter(json.loads(embedded.sft_dataset_info_path.read_text()))))
    align = open_prompts(embedded.align_path, require_teacher=True)
    rl = open_prompts(embedded.rl_path, require_teacher=False)
    warmup = open_warmup(embedded.warmup_path)
    stats = DataStats()
    rows = range(10)
    assert len(list(checked(rows, lambda row: builder.sft_sequence(sft[row]), "raise", stats))) == 10
    samples = list(checked(rows, lambda row: builder.prompt_sample(align[row]), "raise", stats))
    assert all(len(builder.teacher_segments(sample)) == 2 for sample in samples)
    # Ids name the file, not its folder: they are kept in run folders and compared across machines and clones.
    assert [sample.uid for sample in samples] == [f"align.parquet:{row}" for row in rows]
    assert len(list(checked(rows, lambda row: builder.prompt_sample(rl[row]), "raise", stats))) == 10
    assert len(list(checked(rows, lambda row: builder.warmup_pairs(warmup[row]), "raise", stats))) == 10
    assert (stats.read, stats.kept, stats.truncated) == (40, 40, 0)
