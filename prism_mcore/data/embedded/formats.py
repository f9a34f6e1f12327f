"""Writers for the embedded task's files, in the on-disk formats of the real PRISM datasets (PRISM_SPEC §7, §2.5).

- SFT: LLaMA-Factory sharegpt multimodal JSONL (`messages` with role/content, `<image>` in the user turn, `images`
  as paths relative to the data folder), registered in `dataset_info.json`.
- Alignment, RL, validation and test: verl RL parquet (`prompt` = system + user messages, `images` = list of
  {"bytes", "path"}, `data_source` = "mm_gad", `reward_model` = {"ground_truth", "style": "rule"}, `extra_info`).
  Alignment, validation and test rows also carry `teacher_caption`, `teacher_cot` and `teacher_response`; RL rows
  do not, as in the reference's RL parquet.
- Discriminator warmup: pairwise JSONL (`prompt`, `image`, `teacher_caption`, `student_caption`, `teacher_cot`,
  `student_cot`).

`extra_info` records the task, the question's parameters and the scene as JSON, enough to recompute every answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from prism_mcore.data.embedded.scenes import png_bytes, render, scene_to_dict
from prism_mcore.data.embedded.task import Example
from prism_mcore.data.prompts import SYSTEM_PROMPT, prompt_messages, user_prompt

DATA_SOURCE = "mm_gad"  # routes the verifiable reward to the mm_gad rule judge (PRISM_SPEC §6.1)
SFT_DATASET_NAME = "prism_embedded_sft"
SFT_FILE = "sft.jsonl"
DATASET_INFO_FILE = "dataset_info.json"
WARMUP_FILE = "warmup.jsonl"
IMAGE_DIR = "images"

_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
_EXTRA_INFO = {
    "split": datasets.Value("string"),
    "index": datasets.Value("int64"),
    "uid": datasets.Value("string"),
    "task": datasets.Value("string"),
    "hard": datasets.Value("bool"),
    "question": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "params": datasets.Value("string"),  # JSON
    "scene": datasets.Value("string"),  # JSON
}
PROMPT_FEATURES = datasets.Features(
    {
        "prompt": _MESSAGES,
        "images": datasets.List(datasets.Image()),
        "data_source": datasets.Value("string"),
        "reward_model": {"ground_truth": datasets.Value("string"), "style": datasets.Value("string")},
        "extra_info": _EXTRA_INFO,
    }
)
TEACHER_FEATURES = datasets.Features(
    {
        **PROMPT_FEATURES,
        "teacher_caption": datasets.Value("string"),
        "teacher_cot": datasets.Value("string"),
        "teacher_response": datasets.Value("string"),
    }
)


def _write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _save_images(examples: Sequence[Example], data_dir: Path, split: str) -> list[str]:
    """Render each example's image to `images/<split>/<uid>.png`; return the paths relative to `data_dir`."""
    folder = data_dir / IMAGE_DIR / split
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for example in examples:
        (folder / f"{example.uid}.png").write_bytes(png_bytes(render(example.scene)))
        paths.append(f"{IMAGE_DIR}/{split}/{example.uid}.png")
    return paths


def write_sft(examples: Sequence[Example], data_dir: Path) -> Path:
    """The SFT JSONL of the public demonstrations and its `dataset_info.json`; returns the JSONL path."""
    image_paths = _save_images(examples, data_dir, "sft")
    rows = (
        {
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user_prompt(example.question.text)},
                {"role": "assistant", "content": example.demonstration.text},
            ],
            "images": [image_path],
        }
        for example, image_path in zip(examples, image_paths, strict=True)
    )
    _write_jsonl(rows, data_dir / SFT_FILE)
    dataset_info = {
        SFT_DATASET_NAME: {
            "file_name": SFT_FILE,
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    (data_dir / DATASET_INFO_FILE).write_text(json.dumps(dataset_info, indent=2) + "\n")
    return data_dir / SFT_FILE


def write_warmup(examples: Sequence[Example], data_dir: Path) -> Path:
    """The pairwise warmup JSONL: teacher segments against the public-style student's."""
    image_paths = _save_images(examples, data_dir, "warmup")
    rows = (
        {
            "prompt": example.question.text,
            "image": image_path,
            "teacher_caption": example.teacher.caption,
            "student_caption": example.demonstration.caption,
            "teacher_cot": example.teacher.cot,
            "student_cot": example.demonstration.cot,
        }
        for example, image_path in zip(examples, image_paths, strict=True)
    )
    path = data_dir / WARMUP_FILE
    _write_jsonl(rows, path)
    return path


def _prompt_row(index: int, example: Example, with_teacher: bool) -> dict[str, Any]:
    row = {
        "prompt": prompt_messages(example.question.text),
        "images": [{"bytes": png_bytes(render(example.scene)), "path": f"{example.uid}.png"}],
        "data_source": DATA_SOURCE,
        "reward_model": {"ground_truth": example.teacher.answer, "style": "rule"},
        "extra_info": {
            "split": example.split,
            "index": index,
            "uid": example.uid,
            "task": example.question.task,
            "hard": example.question.hard,
            "question": example.question.text,
            "answer": example.teacher.answer,
            "params": json.dumps(example.question.params, sort_keys=True),
            "scene": json.dumps(scene_to_dict(example.scene), sort_keys=True),
        },
    }
    if with_teacher:
        row["teacher_caption"] = example.teacher.caption
        row["teacher_cot"] = example.teacher.cot
        row["teacher_response"] = example.teacher.text
    return row


def write_prompts(examples: Sequence[Example], path: Path, with_teacher: bool) -> Path:
    """An RL-style parquet of prompts with ground truths (and teacher segments when `with_teacher`)."""
    rows = [_prompt_row(index, example, with_teacher) for index, example in enumerate(examples)]
    features = TEACHER_FEATURES if with_teacher else PROMPT_FEATURES
    # The Arrow table carries the `datasets` features in its schema metadata, so readers decode `images` as images.
    pq.write_table(datasets.Dataset.from_list(rows, features=features).data.table, path)
    return path
