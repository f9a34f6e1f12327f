"""The embedded tokenizer: Qwen3-VL's special tokens and the PRISM tags as single tokens at fixed ids, lossless
round trips, tags that survive `skip_special_tokens`, and the Qwen3-VL-style chat template."""

from __future__ import annotations

import pytest
from transformers import Qwen2Tokenizer

from prism_mcore.data.embedded import EmbeddedAssets
from prism_mcore.data.embedded.task import Example
from prism_mcore.data.embedded.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, token_ids, train_tokenizer
from prism_mcore.data.prompts import SYSTEM_PROMPT, user_prompt
from prism_mcore.rewards.response_format import RESPONSE_TAGS

EXPECTED_IDS = {
    "<|endoftext|>": 620,
    "<|im_start|>": 621,
    "<|im_end|>": 622,
    "<|object_ref_start|>": 623,
    "<|object_ref_end|>": 624,
    "<|box_start|>": 625,
    "<|box_end|>": 626,
    "<|quad_start|>": 627,
    "<|quad_end|>": 628,
    "<|vision_start|>": 629,
    "<|vision_end|>": 630,
    "<|vision_pad|>": 631,
    "<|image_pad|>": 632,
    "<|video_pad|>": 633,
    "<caption>": 634,
    "</caption>": 635,
    "<think>": 636,
    "</think>": 637,
    "<answer>": 638,
    "</answer>": 639,
}


def test_vocabulary_layout(tokenizer) -> None:
    assert isinstance(tokenizer, Qwen2Tokenizer)
    assert len(tokenizer) == VOCAB_SIZE == 640
    assert token_ids(tokenizer) == EXPECTED_IDS
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 622)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 620)
    special = {tokenizer.pad_token, *tokenizer.extra_special_tokens}
    assert special == set(SPECIAL_TOKENS)
    assert not special & set(RESPONSE_TAGS)


def test_tags_and_special_tokens_are_single_tokens(tokenizer) -> None:
    for token, token_id in EXPECTED_IDS.items():
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
        assert tokenizer.encode(f"a{token}b", add_special_tokens=False)[1] == token_id
    # Qwen's pre-tokenizer splits numbers into single digits.
    assert tokenizer.tokenize("1234") == ["1", "2", "3", "4"]


def test_round_trip_keeps_tags_and_drops_special_tokens(tokenizer, task: dict[str, list[Example]]) -> None:
    for example in task["val"] + task["sft"][:200]:
        for response in (example.teacher, example.demonstration or example.teacher):
            ids = tokenizer.encode(response.text + "<|im_end|>", add_special_tokens=False)
            assert ids[-1] == EXPECTED_IDS["<|im_end|>"]
            assert tokenizer.decode(ids) == response.text + "<|im_end|>"
            assert tokenizer.decode(ids, skip_special_tokens=True) == response.text
    vision = tokenizer.encode("<|vision_start|><|image_pad|><|vision_end|>How many?", add_special_tokens=False)
    assert tokenizer.decode(vision, skip_special_tokens=True) == "How many?"


def test_texts_are_short(tokenizer, task: dict[str, list[Example]]) -> None:
    lengths = [len(tokenizer.encode(e.teacher.text)) for examples in task.values() for e in examples]
    assert max(lengths) <= 90
    assert len(tokenizer.encode(SYSTEM_PROMPT)) == 73
    # Every common word is a single token: the whole vocabulary is used by the task's language.
    assert tokenizer.tokenize("How many red circles are there?") == [
        "How",
        "Ġmany",
        "Ġred",
        "Ġcircles",
        "Ġare",
        "Ġthere",
        "?",
    ]


def test_chat_template_renders_qwen3vl_turns(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": "<answer>\n2\n</answer>"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n"
        "<|im_start|>assistant\n<answer>\n2\n</answer><|im_end|>\n"
    )
    prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_prompt("Q?")}]
    assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<image>\nQ?\n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_every_folder_carries_the_same_tokenizer(assets: EmbeddedAssets) -> None:
    files = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    for name in files:
        reference = (assets.processor_path / name).read_bytes()
        assert (assets.policy_path / name).read_bytes() == reference
        assert (assets.discriminator_path / name).read_bytes() == reference


def test_training_refuses_a_vocabulary_the_corpus_cannot_fill() -> None:
    with pytest.raises(ValueError, match="supports only"):
        train_tokenizer(["red circle", "blue square"] * 10, vocab_size=VOCAB_SIZE)
