"""The data files: readable by `datasets` in the real PRISM formats (PRISM_SPEC §7, §2.5), consistent with their
scenes, and scored by the project's verifiable reward exactly as intended (every teacher response earns 1.0)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prism_mcore.data.embedded import EmbeddedAssets, TaskSizes
from prism_mcore.data.embedded.scenes import render, scene_from_dict
from prism_mcore.data.embedded.task import Example
from prism_mcore.data.prompts import SYSTEM_PROMPT, prompt_messages
from prism_mcore.rewards.verifiable import verifiable_reward

PROMPT_COLUMNS = ["prompt", "images", "data_source", "reward_model", "extra_info"]
TEACHER_COLUMNS = [*PROMPT_COLUMNS, "teacher_caption", "teacher_cot", "teacher_response"]


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("hf_cache"))


def _parquet(path: Path, cache_dir: str) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache_dir)


@pytest.mark.parametrize(
    ("split", "columns"),
    [("align", TEACHER_COLUMNS), ("rl", PROMPT_COLUMNS), ("val", TEACHER_COLUMNS), ("test", TEACHER_COLUMNS)],
)
def test_prompt_parquet(
    assets: EmbeddedAssets, task: dict[str, list[Example]], hf_cache: str, split: str, columns: list[str]
) -> None:
    path = getattr(assets, f"{split}_path")
    assert pq.read_schema(path).names == columns
    rows = _parquet(path, hf_cache)
    assert len(rows) == getattr(TaskSizes(), split)
    assert isinstance(rows.features["images"].feature, datasets.Image)
    for index, (row, example) in enumerate(zip(rows, task[split], strict=True)):
        # Rows are the (separately verified) examples of the task, in order.
        info = row["extra_info"]
        assert (info["split"], info["index"], info["uid"]) == (split, index, example.uid)
        assert (info["task"], info["question"], info["answer"]) == (
            example.question.task,
            example.question.text,
            example.teacher.answer,
        )
        assert json.loads(info["params"]) == example.question.params
        assert scene_from_dict(json.loads(info["scene"])) == example.scene
        assert info["hard"] is example.question.hard
        assert row["prompt"] == prompt_messages(example.question.text)
        assert row["data_source"] == "mm_gad"
        assert row["reward_model"] == {"ground_truth": example.teacher.answer, "style": "rule"}
        (image,) = row["images"]
        assert image.tobytes() == render(example.scene).tobytes()
        if "teacher_response" in row:
            assert row["teacher_response"] == f"{row['teacher_caption']}\n{row['teacher_cot']}"
            assert row["teacher_cot"].endswith(f"<answer>\n{info['answer']}\n</answer>")
    if split == "align":  # the harder subset
        assert all(info["hard"] for info in rows["extra_info"])


def test_sft_jsonl_is_llamafactory_sharegpt(assets: EmbeddedAssets, hf_cache: str) -> None:
    info = json.loads(assets.sft_dataset_info_path.read_text())
    (entry,) = info.values()
    assert assets.data_dir / entry["file_name"] == assets.sft_path
    assert entry["formatting"] == "sharegpt"
    assert entry["columns"] == {"messages": "messages", "images": "images"}
    rows = datasets.load_dataset("json", data_files=str(assets.sft_path), split="train", cache_dir=hf_cache)
    assert rows.column_names == ["messages", "images"]
    assert len(rows) == TaskSizes().sft
    for row in rows:
        system, user, assistant = row["messages"]
        assert [system["role"], user["role"], assistant["role"]] == ["system", "user", "assistant"]
        assert system["content"] == SYSTEM_PROMPT
        assert user["content"].startswith("<image>\n") and user["content"].count("<image>") == 1
        assert assistant["content"].startswith("<caption>\n- ")
        (image_path,) = row["images"]
        assert (assets.data_dir / image_path).is_file()
    assert Image.open(assets.data_dir / rows[0]["images"][0]).format == "PNG"


def test_warmup_jsonl_pairs(assets: EmbeddedAssets) -> None:
    lines = assets.warmup_path.read_text().splitlines()
    assert len(lines) == TaskSizes().warmup
    for line in lines:
        row = json.loads(line)
        assert list(row) == ["prompt", "image", "teacher_caption", "student_caption", "teacher_cot", "student_cot"]
        assert not row["prompt"].startswith("<image>")
        image = Image.open(io.BytesIO((assets.data_dir / row["image"]).read_bytes()))
        assert image.size in {(96, 96), (96, 64), (112, 112)}
        for side in ("teacher", "student"):
            assert row[f"{side}_caption"].startswith("<caption>\n") and row[f"{side}_caption"].endswith("</caption>")
            assert row[f"{side}_cot"].startswith("<think>\n") and row[f"{side}_cot"].endswith("</answer>")


def test_every_teacher_response_earns_the_full_reward(assets: EmbeddedAssets, tokenizer, hf_cache: str) -> None:
    for split in ("align", "val", "test"):
        for row in _parquet(getattr(assets, f"{split}_path"), hf_cache):
            # As the policy would emit it, decoded the way the reward reads responses.
            ids = tokenizer.encode(row["teacher_response"] + "<|im_end|>", add_special_tokens=False)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            reward = verifiable_reward(text, row["reward_model"]["ground_truth"], data_source=row["data_source"])
            assert (reward.score, reward.accuracy, reward.format) == (1.0, 1.0, 1.0), row["extra_info"]["uid"]


def test_public_demonstrations_earn_full_reward_exactly_when_right(task: dict[str, list[Example]]) -> None:
    rewards = [verifiable_reward(e.demonstration.text, e.teacher.answer).score for e in task["sft"]]
    expected = [1.0 if e.demonstration.answer == e.teacher.answer else 0.2 for e in task["sft"]]
    assert rewards == pytest.approx(expected)
    assert 0.2 in rewards and 1.0 in rewards
