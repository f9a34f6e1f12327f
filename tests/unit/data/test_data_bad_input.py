"""Bad input: each problem raises one `DataError` naming file, row and field, or is skipped and counted by reason.

Every case writes a file whose row 0 is good and whose row 1 is bad, reads it through the reader and the sample
builder, and checks both policies: `on_error="raise"` stops at row 1 with the error; `"skip"` keeps row 0 and counts
row 1 under its reason. Over-long samples are a length policy rather than an error: always skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from prism_mcore.data import errors
from prism_mcore.data.errors import DataError, DataStats, checked
from prism_mcore.data.images import ImageConfig, build_image_processor
from prism_mcore.data.readers import open_prompts, open_sft, open_warmup
from prism_mcore.data.samples import IGNORE_INDEX, LengthLimits, SampleBuilder

GOOD_SFT = {
    "messages": [
        {"role": "user", "content": "<image>\nHow many?\n"},
        {"role": "assistant", "content": "<caption>\n- a\n</caption>\n<think>\n1\n</think>\n<answer>\n1\n</answer>"},
    ],
    "images": ["good.png"],
}
GOOD_PROMPT = {
    "prompt": [{"role": "user", "content": "<image>\nHow many?\n"}],
    "images": ["good.png"],
    "reward_model": {"ground_truth": "1"},
    "teacher_caption": "<caption>\n- a\n</caption>",
    "teacher_cot": "<think>\n1\n</think>\n<answer>\n1\n</answer>",
}
GOOD_WARMUP = {
    "prompt": "How many?",
    "image": "good.png",
    "teacher_caption": "<caption>a</caption>",
    "student_caption": "<caption>b</caption>",
    "teacher_cot": "<think>1</think><answer>1</answer>",
    "student_cot": "<think>2</think><answer>2</answer>",
}


def sft(**changes: Any) -> dict[str, Any]:
    return {**GOOD_SFT, **changes}


def prompt(**changes: Any) -> dict[str, Any]:
    return {**GOOD_PROMPT, **changes}


def warmup(**changes: Any) -> dict[str, Any]:
    return {**GOOD_WARMUP, **changes}


def assistant(content: Any) -> list[dict[str, Any]]:
    return [GOOD_SFT["messages"][0], {"role": "assistant", "content": content}]


@dataclass
class Case:
    kind: str  # "sft", "align" or "warmup": which reader and builder method
    bad_row: dict[str, Any] | str  # a JSON object, or a raw line
    reason: str
    field: str | None
    image_config: ImageConfig | None = None
    limits: LengthLimits | None = None


CASES = {
    "missing image file": Case("sft", sft(images=["nowhere.png"]), errors.IMAGE_MISSING, "images[0]"),
    "corrupt image": Case("sft", sft(images=["garbage.png"]), errors.IMAGE_UNREADABLE, "images[0]"),
    "truncated image": Case("sft", sft(images=["truncated.png"]), errors.IMAGE_UNREADABLE, "images[0]"),
    "image too small": Case("sft", sft(images=["tiny.png"]), errors.IMAGE_TOO_SMALL, "images[0]"),
    "image too large": Case(
        "sft", sft(images=["big.png"]), errors.IMAGE_TOO_LARGE, "images[0]", ImageConfig(max_input_pixels=100 * 100)
    ),
    "image aspect ratio": Case("sft", sft(images=["strip.png"]), errors.IMAGE_ASPECT_RATIO, "images[0]"),
    "more placeholders than images": Case(
        "sft",
        sft(messages=[{"role": "user", "content": "<image><image>Q"}, GOOD_SFT["messages"][1]]),
        errors.IMAGE_COUNT_MISMATCH,
        "messages",
    ),
    # One placeholder per image, but the text itself spells the image token: found when the images are expanded.
    "SFT text spelling the image token": Case(
        "sft",
        sft(messages=[{"role": "user", "content": "<image>\nIs <|image_pad|> a token?"}, GOOD_SFT["messages"][1]]),
        errors.IMAGE_COUNT_MISMATCH,
        "messages",
    ),
    "prompt text spelling the image token": Case(
        "align",
        prompt(prompt=[{"role": "user", "content": "<image>\nIs <|image_pad|> a token?"}]),
        errors.IMAGE_COUNT_MISMATCH,
        "prompt",
    ),
    "missing messages": Case("sft", {"images": ["good.png"]}, errors.MISSING_FIELD, "messages"),
    "messages of the wrong type": Case("sft", sft(messages="hello"), errors.WRONG_TYPE, "messages"),
    "content of the wrong type": Case("sft", sft(messages=assistant(42)), errors.WRONG_TYPE, "messages[1].content"),
    "empty answer": Case("sft", sft(messages=assistant("  \n")), errors.EMPTY_VALUE, "messages[1].content"),
    "unknown role": Case(
        "sft",
        sft(messages=[*GOOD_SFT["messages"], {"role": "tool", "content": "x"}]),
        errors.INVALID_VALUE,
        "messages[2].role",
    ),
    "invalid JSON line": Case("sft", '{"messages": [', errors.UNREADABLE_FILE, None),
    "empty ground truth": Case(
        "align", prompt(reward_model={"ground_truth": ""}), errors.EMPTY_VALUE, "reward_model.ground_truth"
    ),
    "missing teacher CoT": Case("align", prompt(teacher_cot=None), errors.MISSING_FIELD, "teacher_cot"),
    "missing student CoT": Case("warmup", warmup(student_cot=None), errors.MISSING_FIELD, "student_cot"),
    "warmup image too small": Case("warmup", warmup(image="tiny.png"), errors.IMAGE_TOO_SMALL, "image"),
    "prompt over the limit": Case(
        "align",
        prompt(prompt=[{"role": "user", "content": "<image>\n" + "many words " * 60}]),
        errors.TOO_LONG,
        "prompt",
        limits=LengthLimits(max_prompt_length=150),
    ),
    # Teacher segments over max_segment_length are a length filter too: skipped and counted, never an abort.
    "teacher CoT over the limit": Case(
        "align",
        prompt(teacher_cot="<think>\n" + "many words " * 40 + "\n</think>\n<answer>\n1\n</answer>"),
        errors.TOO_LONG,
        "teacher_cot",
        limits=LengthLimits(max_segment_length=40),
    ),
    "warmup teacher caption over the limit": Case(
        "warmup",
        warmup(teacher_caption="<caption>" + "many words " * 40 + "</caption>"),
        errors.TOO_LONG,
        "teacher_caption",
        limits=LengthLimits(max_segment_length=40),
    ),
    "SFT conversation over the limit": Case(
        "sft",
        sft(messages=assistant("long " * 80)),
        errors.TOO_LONG,
        "messages",
        limits=LengthLimits(max_sequence_length=150),
    ),
}


@pytest.fixture
def data_dir(tmp_path: Path, make_image: Callable[..., bytes]) -> Path:
    (tmp_path / "good.png").write_bytes(make_image(64, 64))
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    (tmp_path / "truncated.png").write_bytes(make_image(64, 64)[:200])  # header intact, pixel data cut
    (tmp_path / "tiny.png").write_bytes(make_image(20, 40))
    (tmp_path / "big.png").write_bytes(make_image(128, 128))
    (tmp_path / "strip.png").write_bytes(make_image(32 * 201, 32))
    return tmp_path


def run(
    case: Case,
    folder: Path,
    on_error: errors.OnError,
    tokenizer: PreTrainedTokenizerBase,
    processor: Qwen2VLImageProcessorPil,
) -> tuple[list[Any], DataStats]:
    good = {"sft": GOOD_SFT, "align": GOOD_PROMPT, "warmup": GOOD_WARMUP}[case.kind]
    bad = case.bad_row if isinstance(case.bad_row, str) else json.dumps(case.bad_row)
    path = folder / f"{case.kind}.jsonl"
    path.write_text(json.dumps(good) + "\n" + bad + "\n")
    stats = DataStats()
    images = build_image_processor(processor, case.image_config or ImageConfig(backend="hf"))
    builder = SampleBuilder(tokenizer, images, case.limits or LengthLimits(), stats)
    reader, build = {
        "sft": (open_sft(path), builder.sft_sequence),
        "align": (open_prompts(path, require_teacher=True), builder.prompt_sample),
        "warmup": (open_warmup(path), builder.warmup_pairs),
    }[case.kind]
    built = list(checked(range(len(reader)), lambda row: build(reader[row]), on_error, stats))
    return built, stats


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.reason != errors.TOO_LONG])
def test_bad_row_raises_one_error_naming_file_row_and_field(
    name: str, data_dir: Path, tokenizer: PreTrainedTokenizerBase, hf_image_processor: Qwen2VLImageProcessorPil
) -> None:
    case = CASES[name]
    with pytest.raises(DataError) as raised:
        run(case, data_dir, "raise", tokenizer, hf_image_processor)
    error = raised.value
    assert (error.reason, error.file, error.row, error.field) == (
        case.reason,
        str(data_dir / f"{case.kind}.jsonl"),
        1,
        case.field,
    )
    assert str(error).startswith(f"{data_dir / case.kind}.jsonl, row 1")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_row_is_skipped_and_counted(
    name: str, data_dir: Path, tokenizer: PreTrainedTokenizerBase, hf_image_processor: Qwen2VLImageProcessorPil
) -> None:
    case = CASES[name]
    # Over-long rows are filtered under either policy; everything else only under "skip".
    on_error = "raise" if case.reason == errors.TOO_LONG else "skip"
    built, stats = run(case, data_dir, on_error, tokenizer, hf_image_processor)
    assert len(built) == 1
    assert (stats.read, stats.kept, dict(stats.skipped)) == (2, 1, {case.reason: 1})
    # The skip record is the error's text, which starts with its location.
    location = f"{data_dir / case.kind}.jsonl, row 1" + ("" if case.field is None else f", field {case.field!r}")
    assert stats.first_skipped[case.reason].startswith(f"{location}: ")
    assert stats.summary() == f"read 2, kept 1, truncated 0, skipped 1 ({case.reason}: 1)"


@pytest.mark.parametrize(
    ("question", "image", "reason", "field"),
    [
        ("<image>Q", "tiny.png", errors.IMAGE_TOO_SMALL, "pictures[0]"),
        ("<image>Is <|image_pad|> a token?", "good.png", errors.IMAGE_COUNT_MISMATCH, "dialog"),
    ],
)
def test_renamed_columns_are_named(
    data_dir: Path, builder: SampleBuilder, question: str, image: str, reason: str, field: str
) -> None:
    """A dataset_info.json that renames the columns: errors found after reading (by the image pipeline, when the
    images are expanded) name the file's own columns."""
    row = {"dialog": [{"from": "human", "value": question}, {"from": "gpt", "value": "A"}], "pictures": [image]}
    (data_dir / "dialogs.jsonl").write_text(json.dumps(row) + "\n")
    entry = {
        "file_name": "dialogs.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "dialog", "images": "pictures"},
    }
    (data_dir / "dataset_info.json").write_text(json.dumps({"mine": entry}))
    with pytest.raises(DataError) as raised:
        builder.sft_sequence(open_sft(data_dir, dataset="mine")[0])
    error = raised.value
    assert (error.reason, error.file, error.row, error.field) == (reason, str(data_dir / "dialogs.jsonl"), 0, field)


def test_sft_truncation_cuts_the_tail_and_counts(data_dir: Path, builder: SampleBuilder) -> None:
    path = data_dir / "sft.jsonl"
    path.write_text(json.dumps(sft(messages=assistant("long " * 80))) + "\n")
    example = open_sft(path)[0]
    full = builder.sft_sequence(example)
    truncating = SampleBuilder(
        builder.tokenizer, builder.images, LengthLimits(max_sequence_length=150, over_length="truncate")
    )
    cut = truncating.sft_sequence(example)
    assert len(full) > 150 and len(cut) == 150 and truncating.stats.truncated == 1
    assert torch.equal(cut.input_ids, full.input_ids[:150]) and torch.equal(cut.labels, full.labels[:150])
    assert torch.equal(cut.position_ids, full.position_ids[:, :150])
    assert cut.image_inputs is not None and (cut.labels != IGNORE_INDEX).any()
    # A cut that would drop image tokens (or every target) is not possible: the sample is over-long.
    too_short = SampleBuilder(
        builder.tokenizer, builder.images, LengthLimits(max_sequence_length=40, over_length="truncate")
    )
    with pytest.raises(DataError) as raised:
        too_short.sft_sequence(example)
    assert (raised.value.reason, raised.value.row) == (errors.TOO_LONG, 0)


def test_unreadable_file_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as raised:
        open_sft(tmp_path / "absent.jsonl")
    assert (raised.value.reason, raised.value.file) == (errors.UNREADABLE_FILE, str(tmp_path / "absent.jsonl"))
    with pytest.raises(DataError, match="expected a .json, .jsonl or .parquet file"):
        open_sft(tmp_path / "data.csv")
