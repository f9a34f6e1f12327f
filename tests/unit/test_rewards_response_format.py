"""Tests for prism_mcore.rewards.response_format: the validity rule and caption/CoT segmentation (PRISM_SPEC §1).

Segmentation is checked against the reference's definition, computed by brute force (one decode per prefix), on two
small byte-level BPE tokenizers built here: one with the response tags as single added tokens, one without (so
`</caption>` spans three tokens, as in Qwen3). Characters the tokenizers never saw in training are split into byte
tokens, so prefixes that end inside a character decode to U+FFFD.
"""

from __future__ import annotations

import random
import time

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prism_mcore.record import Sample, SegmentBounds
from prism_mcore.rewards.response_format import (
    RESPONSE_FORMAT_REGEX,
    RESPONSE_TAGS,
    ResponseSegmenter,
    match_response_format,
    vision_token_ids,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
TRAINING_TEXT = [
    "<caption>\n- a red circle and a blue square\n</caption>\n<think>\nThe area is 3 times 4.\n</think>\n"
    "<answer>\n12 cm\n</answer>",
    "The answer is (C). Half of one is 0.5, a quarter is 0.25.",
]
CANONICAL = "<caption>\n- a red circle\n</caption>\n<think>\nThe area is 12.\n</think>\n<answer>\n12 cm\n</answer>"


def build_tokenizer(with_tags: bool) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    if with_tags:  # as in Qwen3's vocabulary: added, but not special, so they survive skip_special_tokens
        tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in RESPONSE_TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module", params=["tag_tokens", "no_tag_tokens"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return build_tokenizer(with_tags=request.param == "tag_tokens")


@pytest.fixture(scope="module")
def tagged_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(with_tags=True)


def ids_of(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def eos_ids(tokenizer: PreTrainedTokenizerFast) -> set[int]:
    return {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}


def brute_force_bounds(response_ids: list[int], tokenizer: PreTrainedTokenizerFast) -> SegmentBounds:
    """The reference's O(L)-decode definition of the split (PRISM_SPEC §1), for responses of at least two tokens."""
    eos = eos_ids(tokenizer)
    valid_length = next((i + 1 for i, t in enumerate(response_ids) if t in eos), len(response_ids))
    text = tokenizer.decode(response_ids[:valid_length], skip_special_tokens=True)
    match = RESPONSE_FORMAT_REGEX.match(text)
    if match is None:
        return SegmentBounds(max(1, valid_length // 2), valid_length, False)
    caption_end = next(
        k
        for k in range(1, valid_length + 1)
        if match.group(1) in tokenizer.decode(response_ids[:k], skip_special_tokens=True)
    )
    return SegmentBounds(caption_end, valid_length, True)


# --- the validity rule ---

PIECES = [*RESPONSE_TAGS, " ", "\n", "\x1c", "\u00a0", "\u200b", "x", "<", ">", "caption>", "</"]


def test_match_equals_the_reference_regex_on_random_tag_soup() -> None:
    rng = random.Random(0)
    texts = [CANONICAL, " \n" + CANONICAL + "\n\n"]
    texts += ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 14))) for _ in range(4000)]
    # Soups built around a valid skeleton, so that matches are frequent and groups get tested.
    skeleton = ["<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>"]
    for _ in range(4000):
        parts = []
        for tag in skeleton:
            parts.append("".join(rng.choice(PIECES) for _ in range(rng.randint(0, 2))))
            parts.append(tag)
        parts.append("".join(rng.choice([" ", "\n", "x", "</answer>"]) for _ in range(rng.randint(0, 2))))
        texts.append("".join(parts))
    matches = 0
    for text in texts:
        expected = RESPONSE_FORMAT_REGEX.match(text)
        actual = match_response_format(text)
        assert (actual is None) == (expected is None), repr(text)
        if expected is not None:
            matches += 1
            assert (actual.caption, actual.reasoning, actual.caption_end) == (
                expected.group(1),
                expected.group(2),
                expected.end(1),
            ), repr(text)
    assert matches > 400  # the comparison exercised the groups, not only rejections


def test_match_groups_of_a_canonical_response() -> None:
    match = match_response_format("  " + CANONICAL + "\n")
    assert match.caption == "<caption>\n- a red circle\n</caption>"
    assert match.reasoning == "<think>\nThe area is 12.\n</think>\n<answer>\n12 cm\n</answer>"
    assert match.caption_end == 2 + len("<caption>\n- a red circle\n</caption>")


@pytest.mark.parametrize(
    "text",
    [
        "Sure! " + CANONICAL,  # text before <caption>
        CANONICAL + " Done.",  # text after </answer>
        "<caption>a</caption><answer>1</answer>",  # no think part
        "<caption>a</caption>x<think>b</think><answer>1</answer>",  # text between the parts
    ],
)
def test_invalid_formats_do_not_match(text: str) -> None:
    assert match_response_format(text) is None
    assert RESPONSE_FORMAT_REGEX.match(text) is None


def test_match_is_linear_where_the_regex_backtracks_cubically() -> None:
    # 3000 repeated tag triples and trailing junk: the reference regex would need hours on this text.
    text = "<caption>ab</caption><think>cd</think><answer>e</answer>" * 3000 + " junk"
    start = time.perf_counter()
    assert match_response_format(text) is None
    assert match_response_format(text.removesuffix(" junk")).caption == "<caption>ab</caption>"
    assert time.perf_counter() - start < 2.0


# --- segmentation ---


def response_cases(tokenizer: PreTrainedTokenizerFast) -> dict[str, list[int]]:
    def encode(*pieces: str) -> list[int]:
        """The pieces encoded one by one, so no token spans two pieces."""
        return [token_id for piece in pieces for token_id in ids_of(tokenizer, piece)]

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    body = "\n<think>\nx\n</think>\n<answer>\n3\n</answer>"
    return {
        "canonical": encode(CANONICAL) + [eos],
        "leading_whitespace": encode("\n  " + CANONICAL) + [eos],
        "unseen_multibyte_caption": encode("<caption>\n- 猫在桌子上\n</caption>" + body) + [eos],
        "multibyte_just_before_the_tag": encode("<caption>猫</caption>" + body) + [eos],
        "truncated_without_eos": encode(CANONICAL),
        "eos_then_padding_and_junk": encode(CANONICAL) + [eos, pad, pad] + encode("<caption>junk"),
        "special_token_inside_caption": encode("<caption>a") + [im_start] + encode("b</caption>" + body) + [eos],
        "caption_closed_twice": encode("<caption>a</caption>y</caption>" + body) + [eos],
        # `</caption>` spelled with ordinary tokens, then the tag token later, inside the reasoning.
        "tag_spelled_out": encode("<caption>a", "</", "caption>", "\n<think>see </caption></think><answer>1</answer>")
        + [eos],
        "text_before_caption": encode("Sure! " + CANONICAL) + [eos],
        "text_after_answer": encode(CANONICAL + " Done.") + [eos],
        "missing_think": encode("<caption>a</caption><answer>1</answer>") + [eos],
    }


CASE_NAMES = list(response_cases(build_tokenizer(with_tags=True)))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_segments_equal_the_brute_force_definition(tokenizer: PreTrainedTokenizerFast, case: str) -> None:
    response_ids = response_cases(tokenizer)[case]
    bounds, text = ResponseSegmenter(tokenizer, eos_ids(tokenizer)).segment(response_ids)
    expected = brute_force_bounds(response_ids, tokenizer)
    assert bounds == expected
    assert text == tokenizer.decode(response_ids[: expected.valid_length], skip_special_tokens=True)
    assert 0 < bounds.caption_end < bounds.valid_length  # both segments hold tokens


def test_canonical_split_with_the_tag_token(tagged_tokenizer: PreTrainedTokenizerFast) -> None:
    response_ids = response_cases(tagged_tokenizer)["canonical"]
    close_id = tagged_tokenizer.convert_tokens_to_ids("</caption>")
    bounds, text = ResponseSegmenter(tagged_tokenizer, eos_ids(tagged_tokenizer)).segment(response_ids)
    assert bounds == SegmentBounds(response_ids.index(close_id) + 1, len(response_ids), True)
    assert text == CANONICAL  # the trailing <|im_end|> is dropped


def test_spelled_out_tag_splits_after_its_last_piece(tagged_tokenizer: PreTrainedTokenizerFast) -> None:
    response_ids = response_cases(tagged_tokenizer)["tag_spelled_out"]
    caption_end = sum(len(ids_of(tagged_tokenizer, piece)) for piece in ("<caption>a", "</", "caption>"))
    bounds, _ = ResponseSegmenter(tagged_tokenizer, eos_ids(tagged_tokenizer)).segment(response_ids)
    assert bounds.caption_end == caption_end and bounds.format_valid


class CountingTokenizer:
    """Forwards to a tokenizer and counts decodes."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer, self.decodes = tokenizer, 0

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decodes += 1
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str) -> int | None:
        return self.tokenizer.convert_tokens_to_ids(tokens)


@pytest.mark.parametrize(("with_tags", "max_decodes"), [(True, 3), (False, 1 + 11)])
def test_segmentation_decodes_a_handful_of_times_not_once_per_token(with_tags: bool, max_decodes: int) -> None:
    tokenizer = build_tokenizer(with_tags)
    caption = "<caption>\n" + "- a red circle and a blue square\n" * 40 + "</caption>"
    response_ids = ids_of(tokenizer, caption + "\n<think>\n" + "The area is 3 times 4.\n" * 40 + "</think>")
    response_ids += ids_of(tokenizer, "\n<answer>\n12 cm\n</answer>") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert 1024 < len(response_ids) <= 2048  # so bisection takes at most 11 steps
    counting = CountingTokenizer(tokenizer)
    segmenter = ResponseSegmenter(counting, eos_ids(tokenizer))
    counting.decodes = 0
    bounds, _ = segmenter.segment(response_ids)
    # the full text, then two checks of the tag-token split, or the bisection
    assert counting.decodes <= max_decodes
    assert bounds == brute_force_bounds(response_ids, tokenizer)


def test_vision_tokens_make_a_response_invalid(tagged_tokenizer: PreTrainedTokenizerFast) -> None:
    image_pad = tagged_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    response_ids = ids_of(tagged_tokenizer, "<caption>a") + [image_pad] + ids_of(tagged_tokenizer, "</caption>")
    response_ids += ids_of(tagged_tokenizer, "<think>b</think><answer>1</answer><|im_end|>")
    assert vision_token_ids(tagged_tokenizer) == {
        tagged_tokenizer.convert_tokens_to_ids(token)
        for token in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
    }
    bounds, text = ResponseSegmenter(tagged_tokenizer, eos_ids(tagged_tokenizer)).segment(response_ids)
    assert text == "<caption>a</caption><think>b</think><answer>1</answer>"  # the text alone would be valid
    assert bounds == SegmentBounds(len(response_ids) // 2, len(response_ids), False)
    allowed, _ = ResponseSegmenter(tagged_tokenizer, eos_ids(tagged_tokenizer), forbidden_token_ids=()).segment(
        response_ids
    )
    assert allowed.format_valid


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ([], SegmentBounds(0, 0, False)),
        (["<|im_end|>"], SegmentBounds(0, 1, False)),  # the CoT keeps the only token
        (["x", "<|im_end|>"], SegmentBounds(1, 2, False)),
        (["x", "y", "z", "<|im_end|>", "w"], SegmentBounds(2, 4, False)),  # fallback max(1, 4 // 2)
    ],
)
def test_short_and_invalid_responses_use_the_fallback_split(
    tagged_tokenizer: PreTrainedTokenizerFast, response: list[str], expected: SegmentBounds
) -> None:
    response_ids = [tagged_tokenizer.convert_tokens_to_ids(token) for token in response]
    bounds, _ = ResponseSegmenter(tagged_tokenizer, eos_ids(tagged_tokenizer)).segment(response_ids)
    assert bounds == expected


def test_segment_samples_fills_text_and_segments(tagged_tokenizer: PreTrainedTokenizerFast) -> None:
    cases = response_cases(tagged_tokenizer)
    samples = [Sample(uid="p0", prompt_ids=[1], response_ids=cases[name]) for name in ("canonical", "missing_think")]
    ResponseSegmenter(tagged_tokenizer, eos_ids(tagged_tokenizer)).segment_samples(samples)
    assert samples[0].response_text == CANONICAL and samples[0].format_valid
    assert samples[1].response_text == "<caption>a</caption><answer>1</answer>" and not samples[1].format_valid


def test_special_response_tags_are_rejected() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|im_end|>", "</caption>"])
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="'</caption>' is a special token"):
        ResponseSegmenter(hf_tokenizer, {0})
    with pytest.raises(ValueError, match="eos_token_ids is empty"):
        ResponseSegmenter(build_tokenizer(with_tags=True), set())
