"""Bounded inputs and whole-file errors: a row over `max_row_bytes` is refused before it is decoded, parsed or
tokenized (raised or skipped by the data policy, naming file, row and field); a file that cannot be read names the
line and the cause; prompts are built per step with exactly the samples and order of an eager build."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from prism_mcore.data import errors
from prism_mcore.data.batching import batch_for_step
from prism_mcore.data.embedded.build import EmbeddedAssets
from prism_mcore.data.errors import DataError, DataStats, checked
from prism_mcore.data.readers import open_prompts, open_sft
from prism_mcore.data.samples import LengthLimits, SampleBuilder

MAX_ROW_BYTES = 32 * 2**20  # the documented default of data.max_row_bytes
GOOD = {
    "messages": [
        {"role": "user", "content": "How many?"},
        {"role": "assistant", "content": "<caption>\n- a\n</caption>\n<think>\n1\n</think>\n<answer>\n1\n</answer>"},
    ]
}


class BoundedTokenizer:
    """The real tokenizer, failing the test if asked to encode more text than any sane row holds."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_chars: int) -> None:
        self._tokenizer = tokenizer
        self._max_chars = max_chars

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def encode(self, text: str, **kwargs):
        assert len(text) <= self._max_chars, f"tokenized {len(text)} characters"
        return self._tokenizer.encode(text, **kwargs)

    def apply_chat_template(self, chat, **kwargs):
        assert sum(len(str(turn["content"])) for turn in chat) <= self._max_chars, "rendered an over-size row"
        return self._tokenizer.apply_chat_template(chat, **kwargs)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_an_oversize_row_is_refused_before_it_is_parsed_or_tokenized(
    tmp_path: Path, builder: SampleBuilder, on_error: errors.OnError
) -> None:
    huge = {"messages": [GOOD["messages"][0], {"role": "assistant", "content": "x" * (MAX_ROW_BYTES + 2**20)}]}
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(huge) + "\n")  # the over-size row is line 2
    reader = open_sft(path)  # the default bound, data.max_row_bytes = 32 MiB
    bounded = SampleBuilder(BoundedTokenizer(builder.tokenizer, 2**20), builder.images, LengthLimits())
    stats = DataStats()
    convert = lambda row: bounded.sft_sequence(reader[row])  # noqa: E731
    if on_error == "raise":
        with pytest.raises(DataError) as raised:
            list(checked(range(len(reader)), convert, on_error, stats))
        error = raised.value
        assert (error.reason, error.file, error.row, error.field) == (errors.ROW_TOO_LARGE, str(path), 2, None)
        assert str(error) == (
            f"{path}, row 2: row is 33.0 MiB, over data.max_row_bytes={MAX_ROW_BYTES} [row_too_large]"
        )
    else:
        assert len(list(checked(range(len(reader)), convert, on_error, stats))) == 1
        assert dict(stats.skipped) == {errors.ROW_TOO_LARGE: 1}


def test_an_oversize_parquet_row_names_its_largest_column(tmp_path: Path, make_image: Callable[..., bytes]) -> None:
    image = make_image(64, 64)
    rows = [
        {"prompt": [{"role": "user", "content": "<image>How many?"}], "images": [{"bytes": image, "path": None}],
         "reward_model": {"ground_truth": str(index)}}
        for index in range(3)
    ]  # fmt: skip
    rows[1]["images"] = [{"bytes": image + b"\0" * 50_000, "path": None}]
    path = tmp_path / "rl.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    reader = open_prompts(path, require_teacher=False, max_row_bytes=len(image) + 10_000)
    assert reader[0].ground_truth == "0" and reader[2].ground_truth == "2"
    with pytest.raises(DataError) as raised:
        reader[1]
    assert (raised.value.reason, raised.value.row, raised.value.field) == (errors.ROW_TOO_LARGE, 1, "images")


@pytest.mark.parametrize(
    ("name", "content", "cause"),
    [
        ("bad.jsonl", json.dumps(GOOD).encode() + b'\n{"messages": "\xff"}\n', "line 1: not UTF-8 (byte 0xff at column 14)"),
        ("bad.json", b"[" + json.dumps(GOOD).encode() + b',\n {"messages": [', "line 1: invalid JSON (Expecting value at column 15)"),
        ("bad.parquet", b"PAR1 this is not a parquet file", "Parquet magic bytes not found"),
    ],
)  # fmt: skip
def test_an_unreadable_file_names_the_line_and_the_cause(tmp_path: Path, name: str, content: bytes, cause: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as raised:
        open_sft(path)
    assert raised.value.reason == errors.UNREADABLE_FILE and raised.value.file == str(path)
    assert cause in raised.value.message and "An error occurred while generating the dataset" not in str(raised.value)


def test_an_empty_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.json: the file is empty \[unreadable_file\]"):
        open_sft(tmp_path / "empty.json")


@pytest.mark.parametrize("max_prompt_length", [2048, 110])  # 110 tokens drops some of the embedded prompts
def test_prompts_built_per_step_equal_the_eager_build(
    embedded: EmbeddedAssets, builder: SampleBuilder, max_prompt_length: int
) -> None:
    from prism_mcore.data.samples import PromptSet

    limits = LengthLimits(max_prompt_length=max_prompt_length)
    reader = open_prompts(embedded.align_path, require_teacher=True)
    eager_builder = SampleBuilder(builder.tokenizer, builder.images, limits)
    eager = list(
        checked(range(len(reader)), lambda i: eager_builder.prompt_sample(reader[i]), "skip", eager_builder.stats)
    )
    lazy_builder = SampleBuilder(builder.tokenizer, builder.images, limits)
    prompts = PromptSet.validate(reader, lazy_builder, "skip")
    assert len(prompts) == len(eager) and lazy_builder.stats == eager_builder.stats
    assert (sum(lazy_builder.stats.skipped.values()) > 0) == (max_prompt_length == 110)
    for step in (0, 7, 60):  # 60 x 8 prompts wraps into the second epoch
        for mine, theirs in zip(batch_for_step(prompts, step, 8, 42), batch_for_step(eager, step, 8, 42), strict=True):
            assert mine.uid == theirs.uid and mine.prompt_ids == theirs.prompt_ids
            assert torch.equal(mine.image_inputs.pixel_values, theirs.image_inputs.pixel_values)
            assert torch.equal(mine.image_inputs.image_grid_thw, theirs.image_inputs.image_grid_thw)
            assert (mine.teacher_caption, mine.teacher_cot, mine.images) == (
                theirs.teacher_caption,
                theirs.teacher_cot,
                theirs.images,
            )
    assert [sample.uid for sample in prompts.head(5)[:]] == [sample.uid for sample in eager[:5]]
    assert len(prompts.head(0)) == len(eager)


def test_the_documented_row_bound_is_the_default() -> None:
    from prism_mcore.config import Config
    from prism_mcore.data.readers import MAX_ROW_BYTES as default

    assert default == MAX_ROW_BYTES == Config().data.max_row_bytes
