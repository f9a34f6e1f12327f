"""Readers of the released formats: SFT sharegpt (JSON, JSONL, parquet, dataset_info.json), alignment/RL parquet,
warmup JSONL; image references as paths, URLs, bytes and `{"bytes", "path"}` dicts."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prism_mcore.data.embedded.build import EmbeddedAssets
from prism_mcore.data.readers import (
    ChatMessage,
    RowOrigin,
    WarmupPair,
    open_prompts,
    open_sft,
    open_warmup,
)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def png(tmp_path: Path, make_image: Callable[..., bytes]) -> bytes:
    """A 64x64 PNG, also saved as `images/a.png` under tmp_path."""
    data = make_image(64, 64)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(data)
    return data


MESSAGES = [
    {"role": "user", "content": "<image>\nHow many circles?\n"},
    {
        "role": "assistant",
        "content": "<caption>\n- two circles\n</caption>\n<think>\n2\n</think>\n<answer>\n2\n</answer>",
    },
]
EXPECTED_MESSAGES = [ChatMessage(m["role"], m["content"]) for m in MESSAGES]


def test_sft_messages_layout_jsonl_resolves_relative_images(tmp_path: Path, png: bytes) -> None:
    # A blank line is not a row; rows keep their line numbers.
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES, "images": ["images/a.png"]}) + "\n\n")
    with path.open("a") as handle:
        handle.write(json.dumps({"messages": MESSAGES, "images": [str(tmp_path / "images" / "a.png")]}) + "\n")
    reader = open_sft(path)
    assert len(reader) == 2
    first, second = reader[0], reader[1]
    assert first.origin == RowOrigin(str(path), 0) and second.origin == RowOrigin(str(path), 2)
    assert first.messages == EXPECTED_MESSAGES
    assert first.images == [png] and second.images == [png]


def test_sft_conversations_layout_json_array_with_system_column(tmp_path: Path, png: bytes) -> None:
    row = {
        "conversations": [
            {"from": "human", "value": "<image>Describe."},
            {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "And its colour?"},
            {"from": "gpt", "value": "Red."},
        ],
        "system": "Be brief.",
        "images": ["images/a.png"],
    }
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([row]))
    example = open_sft(path)[0]
    assert [(m.role, m.content) for m in example.messages] == [
        ("system", "Be brief."),
        ("user", "<image>Describe."),
        ("assistant", "A square."),
        ("user", "And its colour?"),
        ("assistant", "Red."),
    ]
    assert example.images == [png]


def test_sft_parquet_with_image_bytes(tmp_path: Path, png: bytes) -> None:
    path = write_parquet(tmp_path / "sft.parquet", [{"messages": MESSAGES, "images": [{"bytes": png, "path": None}]}])
    example = open_sft(path)[0]
    assert example.messages == EXPECTED_MESSAGES and example.images == [png]


def test_sft_dataset_info_renames_columns_and_tags(tmp_path: Path, png: bytes) -> None:
    write_jsonl(
        tmp_path / "dialogs.jsonl",
        [
            {
                "dialog": [{"speaker": "me", "text": "<image>Q"}, {"speaker": "bot", "text": "A"}],
                "pictures": ["images/a.png"],
            }
        ],
    )
    entry = {
        "file_name": "dialogs.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "dialog", "images": "pictures"},
        "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": entry}))
    example = open_sft(tmp_path, dataset="mine")[0]
    assert example.messages == [ChatMessage("user", "<image>Q"), ChatMessage("assistant", "A")]
    assert example.images == [png]
    assert example.images_column == "pictures"  # what later errors about the images name


def test_embedded_sft_through_its_dataset_info(embedded: EmbeddedAssets) -> None:
    reader = open_sft(embedded.data_dir, dataset=json.loads(embedded.sft_dataset_info_path.read_text()).popitem()[0])
    example = reader[0]
    assert [m.role for m in example.messages] == ["system", "user", "assistant"]
    assert len(example.images) == 1 and example.images[0].startswith(b"\x89PNG")


PROMPT = [{"role": "system", "content": "sys"}, {"role": "user", "content": "<image>\nHow many?\n"}]


def prompt_row(images: Any, **fields: Any) -> dict[str, Any]:
    row = {
        "data_source": "mm_gad",
        "prompt": PROMPT,
        "images": images,
        "reward_model": {"ground_truth": "2", "style": "rule"},
        "extra_info": {"index": 7},
        "teacher_caption": "<caption>\n- two\n</caption>",
        "teacher_cot": "<think>\n1+1\n</think>\n<answer>\n2\n</answer>",
    }
    row.update(fields)
    return row


@pytest.mark.parametrize("form", ["bytes", "relative path", "absolute path", "dict with bytes", "dict with path"])
def test_alignment_parquet_accepts_every_image_form(tmp_path: Path, png: bytes, form: str) -> None:
    image = {
        "bytes": png,
        "relative path": "images/a.png",
        "absolute path": str(tmp_path / "images" / "a.png"),
        "dict with bytes": {"bytes": png, "path": "not-read-when-bytes-are-set.png"},
        "dict with path": {"bytes": None, "path": "images/a.png"},
    }[form]
    path = write_parquet(tmp_path / "align.parquet", [prompt_row([image])])
    assert open_prompts(path, require_teacher=True)[0].images == [png]


def test_alignment_parquet_written_by_datasets_keeps_image_bytes(tmp_path: Path, png: bytes) -> None:
    """A parquet with `datasets`' Image feature is read without decoding: records carry the original file bytes."""
    features = datasets.Features(
        {
            "prompt": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "images": datasets.List(datasets.Image()),
            "reward_model": {"ground_truth": datasets.Value("string")},
        }
    )
    table = datasets.Dataset.from_list(
        [{"prompt": PROMPT, "images": [{"bytes": png, "path": None}], "reward_model": {"ground_truth": "2"}}],
        features=features,
    )
    table.to_parquet(tmp_path / "rl.parquet")
    record = open_prompts(tmp_path / "rl.parquet", require_teacher=False)[0]
    assert record.images == [png]
    assert record.teacher_caption is None and record.teacher_cot is None and record.data_source == ""


def test_prompt_record_fields(tmp_path: Path, png: bytes) -> None:
    path = write_parquet(tmp_path / "align.parquet", [prompt_row([png])])
    record = open_prompts(path, require_teacher=True)[0]
    assert record.messages == [ChatMessage("system", "sys"), ChatMessage("user", "<image>\nHow many?\n")]
    assert record.ground_truth == "2" and record.data_source == "mm_gad"
    assert record.teacher_caption == "<caption>\n- two\n</caption>"
    assert record.teacher_cot == "<think>\n1+1\n</think>\n<answer>\n2\n</answer>"
    assert record.extra_info == {"index": 7} and record.equivalent_answers is None


@pytest.mark.parametrize(
    ("reward_model", "extra_info", "expected"),
    [
        ({"ground_truth": "0.5", "equivalent_answers": ["1/2", "50%"]}, {}, ["1/2", "50%"]),
        ({"ground_truth": "0.5"}, {"equivalent_answers": ["1/2"]}, ["1/2"]),
        ({"ground_truth": "0.5", "equivalent_answers": ["1/2", "__EMPTY__"]}, {}, None),
    ],
)
def test_equivalent_answers(
    tmp_path: Path, png: bytes, reward_model: dict[str, Any], extra_info: dict[str, Any], expected: list[str] | None
) -> None:
    path = write_jsonl(
        tmp_path / "rl.jsonl", [prompt_row(["images/a.png"], reward_model=reward_model, extra_info=extra_info)]
    )
    assert open_prompts(path, require_teacher=False)[0].equivalent_answers == expected


def test_numeric_ground_truth_is_taken_as_text(tmp_path: Path, png: bytes) -> None:
    path = write_jsonl(tmp_path / "rl.jsonl", [prompt_row(["images/a.png"], reward_model={"ground_truth": 3})])
    assert open_prompts(path, require_teacher=False)[0].ground_truth == "3"


def test_warmup_lines(tmp_path: Path, png: bytes) -> None:
    path = write_jsonl(
        tmp_path / "warmup.jsonl",
        [
            {
                "prompt": "How many?",
                "image": "images/a.png",
                "teacher_caption": "<caption>T</caption>",
                "student_caption": "<caption>S</caption>",
                "teacher_cot": "<think>t</think><answer>2</answer>",
                "student_cot": "<think>s</think><answer>3</answer>",
            },
            {"question": "Why?", "teacher_response": "because", "student_response": "dunno"},
        ],
    )
    reader = open_warmup(path)
    segments, whole = reader[0], reader[1]
    assert segments.prompt == "How many?" and segments.image == png
    assert segments.pairs == [
        WarmupPair("caption", "<caption>T</caption>", "<caption>S</caption>"),
        WarmupPair("cot", "<think>t</think><answer>2</answer>", "<think>s</think><answer>3</answer>"),
    ]
    assert whole.prompt == "Why?" and whole.image is None
    assert whole.pairs == [WarmupPair("response", "because", "dunno")]


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[str]:
    """An HTTP server on localhost serving tmp_path; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_warmup_image_from_url(tmp_path: Path, png: bytes, http_folder: str) -> None:
    path = write_jsonl(
        tmp_path / "warmup.jsonl",
        [{"prompt": "Q", "image": f"{http_folder}/images/a.png", "teacher_response": "a", "student_response": "b"}],
    )
    assert open_warmup(path)[0].image == png
