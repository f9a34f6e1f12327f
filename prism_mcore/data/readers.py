"""Readers for the released PRISM data (PRISM_SPEC §2.5, §7), through the `datasets` library, with validation.

Three kinds of file, each read into typed records:

- SFT demonstrations, LLaMA-Factory `sharegpt` multimodal form -> `SftExample`: a `messages` list (`role`/`content`,
  roles user/assistant/system) or a `conversations` list (`from`/`value`, roles human/gpt/system), plus an `images`
  list; JSON, JSONL or parquet; optionally registered in a `dataset_info.json` whose `columns`/`tags` rename them.
- Alignment and RL prompts, verl parquet -> `PromptRecord` (the sample builder turns it into a `record.Sample`):
  `prompt` (chat messages with `<image>` placeholders), `images`, `reward_model.ground_truth`, optional
  `equivalent_answers` (in `reward_model` or `extra_info`; an `__EMPTY__` entry disables them, PRISM_SPEC §6.3),
  `data_source`, `extra_info`, and `teacher_caption`/`teacher_cot`, required for alignment.
- Discriminator warmup pairs, JSONL -> `WarmupExample`: `prompt` (or `question`), an optional `image`, and either the
  four caption/CoT fields (one caption and one CoT comparison per line) or `teacher_response`/`student_response`
  (one whole-response comparison) when neither teacher segment is given.

An image may be a path (relative paths resolve against the data file's folder), an http(s) URL, raw bytes, or a
`{"bytes", "path"}` dict as `datasets`' Image feature stores it; records carry the encoded file bytes. Every problem
raises one `DataError` naming the file, the 0-based row (the line number for JSONL) and the field; `errors.checked`
applies the raise/skip policy. Rows are parsed when they are read, so large files are never validated up front. A
row larger than `max_row_bytes` (its JSONL line, or its columns' Arrow bytes, embedded image bytes included) is
refused before it is decoded into Python objects, parsed or tokenized (`row_too_large`). A file that cannot be read
at all (missing, empty, not UTF-8, truncated JSON, not parquet) raises one `DataError` naming the file, and the line
and cause where the format has lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import datasets
import pyarrow.parquet as pq
from datasets import Features

from prism_mcore.data.errors import (
    EMPTY_VALUE,
    IMAGE_COUNT_MISMATCH,
    IMAGE_MISSING,
    INVALID_VALUE,
    MISSING_FIELD,
    ROW_TOO_LARGE,
    UNREADABLE_FILE,
    WRONG_TYPE,
    DataError,
)
from prism_mcore.data.images import ImageReadLimits, ImageSourceError, fetch_image_url, read_image_file
from prism_mcore.data.prompts import IMAGE_PLACEHOLDER

Role = Literal["system", "user", "assistant"]
SegmentKind = Literal["caption", "cot", "response"]  # what a discriminator comparison scores

EMPTY_EQUIVALENTS = "__EMPTY__"  # an `equivalent_answers` entry that disables them (PRISM_SPEC §6.3)
MAX_ROW_BYTES = 32 * 2**20  # the default of `data.max_row_bytes`
SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class RowOrigin:
    """Where a record came from: the data file and its 0-based row (line number for JSONL)."""

    file: str
    row: int

    def __str__(self) -> str:
        return f"{self.file}:{self.row}"

    @property
    def uid(self) -> str:
        """`<file name>:<row>`, the sample id of the row: without the file's folder, so that ids kept in a run
        folder (warmup self-play) and compared across runs do not depend on the machine or the clone."""
        return f"{Path(self.file).name}:{self.row}"


@dataclass
class ChatMessage:
    role: Role
    content: str  # text with one `<image>` placeholder per image, in the order of the record's images


@dataclass
class SftExample:
    """One SFT conversation; every assistant turn is a training target."""

    origin: RowOrigin
    messages: list[ChatMessage]
    images: list[bytes]  # encoded image files, one per `<image>` placeholder
    # The columns they came from (a dataset_info.json may rename them), for errors found after reading.
    messages_column: str = "messages"
    images_column: str = "images"


@dataclass
class PromptRecord:
    """One alignment/RL prompt with its answer and (for alignment) the teacher's caption and CoT."""

    origin: RowOrigin
    messages: list[ChatMessage]
    images: list[bytes]
    ground_truth: str
    data_source: str = ""
    equivalent_answers: list[str] | None = None
    teacher_caption: str | None = None
    teacher_cot: str | None = None
    extra_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class WarmupPair:
    """One discriminator comparison: the teacher's and the student's text for the same segment."""

    kind: SegmentKind
    teacher: str
    student: str


@dataclass
class WarmupExample:
    """One line of the pairwise warmup data: a prompt, its image, and its comparisons (PRISM_SPEC §2.5)."""

    origin: RowOrigin
    prompt: str
    image: bytes | None
    pairs: list[WarmupPair]


@dataclass(frozen=True)
class SharegptColumns:
    """Column and tag names of a sharegpt dataset, as a `dataset_info.json` entry may rename them."""

    messages: str
    images: str = "images"
    system: str = "system"
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    system_tag: str = "system"

    @classmethod
    def from_dataset_info(cls, entry: Mapping[str, Any]) -> SharegptColumns:
        columns = entry.get("columns", {})
        tags = entry.get("tags", {})
        defaults = cls(messages="conversations")
        return cls(
            messages=columns.get("messages", defaults.messages),
            images=columns.get("images", defaults.images),
            system=columns.get("system", defaults.system),
            role_tag=tags.get("role_tag", defaults.role_tag),
            content_tag=tags.get("content_tag", defaults.content_tag),
            user_tag=tags.get("user_tag", defaults.user_tag),
            assistant_tag=tags.get("assistant_tag", defaults.assistant_tag),
            system_tag=tags.get("system_tag", defaults.system_tag),
        )


# Without a dataset_info.json entry, the two layouts LLaMA-Factory's own examples use are recognised by column name.
MESSAGES_LAYOUT = SharegptColumns(
    messages="messages", role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant"
)
CONVERSATIONS_LAYOUT = SharegptColumns(messages="conversations")

R = TypeVar("R")
RowParser = Callable[[Mapping[str, Any], "RowContext"], R]


@dataclass(frozen=True)
class RowContext:
    """What a row parser needs besides the row: its origin and the folder relative image paths resolve against."""

    origin: RowOrigin
    image_root: Path
    image_limits: ImageReadLimits = ImageReadLimits()

    def error(self, reason: str, message: str, field: str) -> DataError:
        return DataError(reason, message, file=self.origin.file, row=self.origin.row, field=field)


def _undecoded(feature: Any) -> Any:
    """`feature` with every `datasets.Image` set not to decode (so rows hold `{"bytes", "path"}` dicts)."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(mode=feature.mode, decode=False)
    if isinstance(feature, datasets.List):
        return datasets.List(_undecoded(feature.feature), length=feature.length)
    if isinstance(feature, datasets.LargeList):
        return datasets.LargeList(_undecoded(feature.feature))
    if isinstance(feature, dict):
        return type(feature)({name: _undecoded(value) for name, value in feature.items()})
    return feature


def check_data_file(path: str | Path) -> Path:
    """`path` as a Path if it names a readable, non-empty data file of a supported kind; else one `DataError`."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DataError(UNREADABLE_FILE, "expected a .json, .jsonl or .parquet file", file=str(path))
    if not path.exists():
        raise DataError(UNREADABLE_FILE, "no such file", file=str(path))
    if not path.is_file():
        raise DataError(UNREADABLE_FILE, "not a regular file", file=str(path))
    if not os.access(path, os.R_OK):
        raise DataError(UNREADABLE_FILE, "not readable (permission denied)", file=str(path))
    if path.stat().st_size == 0:
        raise DataError(UNREADABLE_FILE, "the file is empty", file=str(path))
    return path


def _first_bad_line(path: Path) -> str | None:
    """Where and why a JSON/JSONL file cannot be decoded (not UTF-8, invalid JSON), or None when it can."""
    data = path.read_bytes()
    for number, line in enumerate(data.split(b"\n")):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            return f"line {number}: not UTF-8 (byte 0x{line[error.start]:02x} at column {error.start})"
    if path.suffix == ".json":
        try:
            json.loads(data)
        except json.JSONDecodeError as error:
            return f"line {error.lineno - 1}: invalid JSON ({error.msg} at column {error.colno - 1})"
    return None


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (`datasets` wraps the reader's error in a generic one)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


class RowTable:
    """The raw rows of one data file as a `datasets.Dataset`.

    Parquet and JSON files are read by `datasets`' Arrow builders. JSONL is read line by line (the `text` builder)
    and each line is decoded when it is accessed, so a bad line is reported with its own line number instead of
    failing the whole file; blank lines are not rows. Line numbers in errors are 0-based, as rows are.
    """

    def __init__(self, path: Path, max_row_bytes: int = MAX_ROW_BYTES) -> None:
        self.path = check_data_file(path)
        self.is_jsonl = path.suffix == ".jsonl"
        self.max_row_bytes = max_row_bytes
        builder = {".parquet": "parquet", ".json": "json", ".jsonl": "text"}[path.suffix]
        try:
            # Image columns stay encoded: records carry file bytes, and decoding is the image pipeline's job.
            features = _undecoded(Features.from_arrow_schema(pq.read_schema(path))) if builder == "parquet" else None
            table = datasets.load_dataset(builder, data_files=str(path), split="train", features=features)
        except Exception as error:  # datasets and Arrow report unreadable files with many exception types
            cause = (_first_bad_line(path) if builder != "parquet" else None) or str(_root_cause(error))
            raise DataError(UNREADABLE_FILE, f"cannot be read: {cause}", file=str(path)) from None
        if self.is_jsonl:
            table = table.add_column("line", list(range(len(table))))
            table = table.filter(
                lambda texts: [bool(text.strip()) for text in texts], input_columns="text", batched=True
            )
        self.table = table
        self._arrow = table.with_format("arrow")  # one-row Arrow tables: sizes known before decoding

    def __len__(self) -> int:
        return len(self.table)

    def _check_size(self, index: int) -> None:
        row = self._arrow[index]
        size = row.nbytes
        if size <= self.max_row_bytes:
            return
        line = row.column("line")[0].as_py() if self.is_jsonl else index
        # A JSONL line is one text; a parquet/JSON row names its largest column.
        field = None if self.is_jsonl else max(row.column_names, key=lambda name: row.column(name).nbytes)
        message = f"row is {size / 2**20:.1f} MiB, over data.max_row_bytes={self.max_row_bytes}"
        raise DataError(ROW_TOO_LARGE, message, file=str(self.path), row=line, field=field)

    def row(self, index: int) -> tuple[int, Mapping[str, Any]]:
        """The row's number in the file and its fields (refused unread when over `max_row_bytes`)."""
        self._check_size(index)
        raw = self.table[index]
        if not self.is_jsonl:
            return index, raw
        line = raw["line"]
        try:
            value = json.loads(raw["text"])
        except json.JSONDecodeError as error:
            raise DataError(UNREADABLE_FILE, f"invalid JSON ({error})", file=str(self.path), row=line) from None
        if not isinstance(value, dict):
            raise DataError(WRONG_TYPE, "a line must hold one JSON object", file=str(self.path), row=line)
        return line, value


class RecordReader(Generic[R]):
    """Typed records of one data file: `reader[i]` parses and validates the i-th row (raising `DataError`).

    Relative image paths resolve against `image_root`, by default the file's folder; rows over `max_row_bytes` are
    refused unread; image files and URLs are read within `image_limits`.
    """

    def __init__(
        self,
        path: str | Path,
        parse: RowParser[R],
        image_root: Path | None = None,
        max_row_bytes: int = MAX_ROW_BYTES,
        image_limits: ImageReadLimits | None = None,
    ) -> None:
        self.path = Path(path)
        self.rows = RowTable(self.path, max_row_bytes)
        self.image_root = image_root if image_root is not None else self.path.parent
        self.image_limits = image_limits or ImageReadLimits()
        self._parse = parse

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> R:
        if not 0 <= index < len(self.rows):
            raise IndexError(index)
        row_number, row = self.rows.row(index)
        return self._parse(row, RowContext(RowOrigin(str(self.path), row_number), self.image_root, self.image_limits))


# --- field access -----------------------------------------------------------------------------------------------


def _text(value: Any, name: str, context: RowContext, *, allow_empty: bool = False) -> str:
    """A required string field; empty or all-whitespace text is an error unless `allow_empty`."""
    if value is None:
        raise context.error(MISSING_FIELD, "required field is missing", name)
    if not isinstance(value, str):
        raise context.error(WRONG_TYPE, f"expected a string, got {type(value).__name__}", name)
    if not allow_empty and not value.strip():
        raise context.error(EMPTY_VALUE, "must not be empty", name)
    return value


def _list(value: Any, name: str, context: RowContext) -> list[Any]:
    if value is None:
        raise context.error(MISSING_FIELD, "required field is missing", name)
    if not isinstance(value, list):
        raise context.error(WRONG_TYPE, f"expected a list, got {type(value).__name__}", name)
    return value


def _object(value: Any, name: str, context: RowContext) -> dict[str, Any]:
    if value is None:
        raise context.error(MISSING_FIELD, "required field is missing", name)
    if not isinstance(value, dict):
        raise context.error(WRONG_TYPE, f"expected an object, got {type(value).__name__}", name)
    return value


def _optional_text(row: Mapping[str, Any], name: str, context: RowContext) -> str | None:
    value = row.get(name)
    return None if value is None else _text(value, name, context)


def _answer(value: Any, name: str, context: RowContext) -> str:
    """A ground truth or equivalent answer: a non-empty string; integers and floats are taken as their text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return _text(value, name, context)


# --- images -----------------------------------------------------------------------------------------------------


def _image_bytes(value: Any, name: str, context: RowContext) -> bytes:
    """The encoded file of one image reference: path, http(s) URL, bytes, or a `{"bytes", "path"}` dict."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path") is not None:
            value = value["path"]
        else:
            raise context.error(MISSING_FIELD, "image dict has neither 'bytes' nor 'path'", name)
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise context.error(WRONG_TYPE, f"expected an image path, URL, bytes or dict, got {type(value).__name__}", name)
    limits = context.image_limits
    try:
        if value.startswith(("http://", "https://")):
            return fetch_image_url(value, limits.max_bytes, limits.url_deadline_s)
        path = Path(value)
        return read_image_file(path if path.is_absolute() else context.image_root / path, limits.max_bytes)
    except ImageSourceError as error:
        raise context.error(IMAGE_MISSING, str(error), name) from None


def _images(value: Any, name: str, context: RowContext) -> list[bytes]:
    if value is None:
        return []
    return [_image_bytes(item, f"{name}[{i}]", context) for i, item in enumerate(_list(value, name, context))]


def _check_placeholders(messages: list[ChatMessage], images: list[bytes], name: str, context: RowContext) -> None:
    placeholders = sum(message.content.count(IMAGE_PLACEHOLDER) for message in messages)
    if placeholders != len(images):
        raise context.error(
            IMAGE_COUNT_MISMATCH,
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)",
            name,
        )
    for index, message in enumerate(messages):
        if message.role != "user" and IMAGE_PLACEHOLDER in message.content:
            raise context.error(
                INVALID_VALUE, f"{IMAGE_PLACEHOLDER} is only allowed in user turns", f"{name}[{index}].content"
            )


# --- SFT --------------------------------------------------------------------------------------------------------


def _sharegpt_messages(row: Mapping[str, Any], columns: SharegptColumns, context: RowContext) -> list[ChatMessage]:
    name = columns.messages
    turns = _list(row.get(name), name, context)
    roles: dict[str, Role] = {
        columns.user_tag: "user",
        columns.assistant_tag: "assistant",
        columns.system_tag: "system",
    }
    messages = []
    for index, turn in enumerate(turns):
        where = f"{name}[{index}]"
        if not isinstance(turn, dict):
            raise context.error(WRONG_TYPE, f"expected a message object, got {type(turn).__name__}", where)
        tag = _text(turn.get(columns.role_tag), f"{where}.{columns.role_tag}", context)
        if tag not in roles:
            raise context.error(
                INVALID_VALUE, f"role {tag!r} is not one of {sorted(roles)}", f"{where}.{columns.role_tag}"
            )
        content_field = f"{where}.{columns.content_tag}"
        content = _text(turn.get(columns.content_tag), content_field, context, allow_empty=roles[tag] != "assistant")
        messages.append(ChatMessage(roles[tag], content))
    system = row.get(columns.system)
    if system is not None and not any(message.role == "system" for message in messages):
        messages.insert(0, ChatMessage("system", _text(system, columns.system, context)))
    if not any(message.role == "assistant" for message in messages):
        raise context.error(INVALID_VALUE, "the conversation has no assistant turn to train on", name)
    return messages


def parse_sft_row(row: Mapping[str, Any], context: RowContext, columns: SharegptColumns | None = None) -> SftExample:
    """One sharegpt row; without `columns` the layout is recognised from the `messages`/`conversations` column."""
    if columns is None:
        if row.get("messages") is not None:
            columns = MESSAGES_LAYOUT
        elif row.get("conversations") is not None:
            columns = CONVERSATIONS_LAYOUT
        else:
            raise context.error(MISSING_FIELD, "a sharegpt row needs a 'messages' or 'conversations' list", "messages")
    messages = _sharegpt_messages(row, columns, context)
    images = _images(row.get(columns.images), columns.images, context)
    _check_placeholders(messages, images, columns.messages, context)
    return SftExample(context.origin, messages, images, columns.messages, columns.images)


def open_sft(
    path: str | Path,
    dataset: str | None = None,
    max_row_bytes: int = MAX_ROW_BYTES,
    image_limits: ImageReadLimits | None = None,
) -> RecordReader[SftExample]:
    """SFT examples from a sharegpt file, or from the entry `dataset` of the `dataset_info.json` in folder `path`.

    A registered dataset's relative image paths resolve against the registry's folder, as in LLaMA-Factory.
    """
    path = Path(path)
    if dataset is None:
        return RecordReader(path, parse_sft_row, max_row_bytes=max_row_bytes, image_limits=image_limits)
    info_path = path / "dataset_info.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(UNREADABLE_FILE, f"cannot read the dataset registry ({error})", file=str(info_path)) from None
    if dataset not in info:
        raise DataError(MISSING_FIELD, f"no dataset named {dataset!r}", file=str(info_path), field=dataset)
    entry = info[dataset]
    if entry.get("formatting", "alpaca") != "sharegpt" or "file_name" not in entry:
        raise DataError(
            INVALID_VALUE, "expected a 'sharegpt' entry with a 'file_name'", file=str(info_path), field=dataset
        )
    columns = SharegptColumns.from_dataset_info(entry)
    return RecordReader(
        path / entry["file_name"],
        lambda row, context: parse_sft_row(row, context, columns),
        image_root=path,
        max_row_bytes=max_row_bytes,
        image_limits=image_limits,
    )


# --- alignment / RL prompts -------------------------------------------------------------------------------------


def _prompt_messages(value: Any, context: RowContext) -> list[ChatMessage]:
    messages = []
    for index, turn in enumerate(_list(value, "prompt", context)):
        where = f"prompt[{index}]"
        if not isinstance(turn, dict):
            raise context.error(WRONG_TYPE, f"expected a message object, got {type(turn).__name__}", where)
        role = _text(turn.get("role"), f"{where}.role", context)
        if role not in ("system", "user"):
            raise context.error(INVALID_VALUE, f"role {role!r} is not 'system' or 'user'", f"{where}.role")
        messages.append(ChatMessage(role, _text(turn.get("content"), f"{where}.content", context, allow_empty=True)))
    if not messages or messages[-1].role != "user":
        raise context.error(INVALID_VALUE, "the prompt must end with a user turn", "prompt")
    return messages


def _equivalent_answers(
    reward_model: Mapping[str, Any], extra_info: Mapping[str, Any], context: RowContext
) -> list[str] | None:
    """`equivalent_answers` from `reward_model` or else `extra_info`; None when absent or disabled by `__EMPTY__`."""
    for name, value in (
        ("reward_model.equivalent_answers", reward_model.get("equivalent_answers")),
        ("extra_info.equivalent_answers", extra_info.get("equivalent_answers")),
    ):
        if value is not None:
            answers = [_answer(item, f"{name}[{i}]", context) for i, item in enumerate(_list(value, name, context))]
            return None if EMPTY_EQUIVALENTS in answers else answers
    return None


def parse_prompt_row(row: Mapping[str, Any], context: RowContext, require_teacher: bool) -> PromptRecord:
    """One verl parquet row; `require_teacher` (alignment data) makes `teacher_caption` and `teacher_cot` required."""
    messages = _prompt_messages(row.get("prompt"), context)
    images = _images(row.get("images"), "images", context)
    _check_placeholders(messages, images, "prompt", context)
    reward_model = _object(row.get("reward_model"), "reward_model", context)
    ground_truth = _answer(reward_model.get("ground_truth"), "reward_model.ground_truth", context)
    extra_info = {} if row.get("extra_info") is None else _object(row["extra_info"], "extra_info", context)
    if require_teacher:
        teacher_caption = _text(row.get("teacher_caption"), "teacher_caption", context)
        teacher_cot = _text(row.get("teacher_cot"), "teacher_cot", context)
    else:
        teacher_caption = _optional_text(row, "teacher_caption", context)
        teacher_cot = _optional_text(row, "teacher_cot", context)
    return PromptRecord(
        origin=context.origin,
        messages=messages,
        images=images,
        ground_truth=ground_truth,
        data_source=_text(row.get("data_source", ""), "data_source", context, allow_empty=True),
        equivalent_answers=_equivalent_answers(reward_model, extra_info, context),
        teacher_caption=teacher_caption,
        teacher_cot=teacher_cot,
        extra_info=dict(extra_info),
    )


def open_prompts(
    path: str | Path,
    *,
    require_teacher: bool,
    max_row_bytes: int = MAX_ROW_BYTES,
    image_limits: ImageReadLimits | None = None,
) -> RecordReader[PromptRecord]:
    """Alignment (`require_teacher=True`) or RL (`False`) prompts from a verl-layout parquet (or JSON/JSONL) file."""
    return RecordReader(
        path,
        lambda row, context: parse_prompt_row(row, context, require_teacher),
        max_row_bytes=max_row_bytes,
        image_limits=image_limits,
    )


# --- warmup pairs -----------------------------------------------------------------------------------------------

SEGMENT_FIELDS = ("teacher_caption", "student_caption", "teacher_cot", "student_cot")


def parse_warmup_row(row: Mapping[str, Any], context: RowContext) -> WarmupExample:
    """One warmup line: caption and CoT comparisons, or one whole-response comparison when no teacher segment."""
    prompt_field = "prompt" if row.get("prompt") is not None else "question"
    prompt = _text(row.get(prompt_field), prompt_field, context)
    image = None if row.get("image") is None else _image_bytes(row["image"], "image", context)
    if row.get("teacher_caption") is None and row.get("teacher_cot") is None:
        teacher = _text(row.get("teacher_response"), "teacher_response", context)
        student = _text(row.get("student_response"), "student_response", context)
        pairs = [WarmupPair("response", teacher, student)]
    else:
        texts = {name: _text(row.get(name), name, context) for name in SEGMENT_FIELDS}
        pairs = [
            WarmupPair("caption", texts["teacher_caption"], texts["student_caption"]),
            WarmupPair("cot", texts["teacher_cot"], texts["student_cot"]),
        ]
    return WarmupExample(context.origin, prompt, image, pairs)


def open_warmup(
    path: str | Path, max_row_bytes: int = MAX_ROW_BYTES, image_limits: ImageReadLimits | None = None
) -> RecordReader[WarmupExample]:
    """Pairwise discriminator-warmup examples from a JSONL (or JSON/parquet) file."""
    return RecordReader(path, parse_warmup_row, max_row_bytes=max_row_bytes, image_limits=image_limits)
