"""The PRISM response format: the validity rule and the caption/CoT split of a response (PRISM_SPEC §1, Decision 5).

A response is valid when, decoded with `skip_special_tokens=True` (which drops the trailing `<|im_end|>`), it reads
`<caption>…</caption>`, `<think>…</think>`, `<answer>…</answer>`, with only whitespace around and between the three
parts. The reference checks this with `RESPONSE_FORMAT_REGEX`. `match_response_format` computes exactly the same match
in linear time: Python's backtracking engine needs cubic time on a long response that repeats the tags and then
fails (about 4 s for 22K characters of repeated tag triples; a 6K-token response of a degenerate policy is longer).

`ResponseSegmenter` turns response token ids into `SegmentBounds`. The caption segment ends at the smallest k such that
`decode(response[:k])` contains the caption (with its tags); the reference finds k with one decode per token. Here:
- when `</caption>` is one token of the vocabulary (our embedded tokenizer), k is just past its first occurrence,
  confirmed with two prefix decodes;
- otherwise (Qwen3 spells `</caption>` with several tokens; or a policy spelled it without the tag token), k is found
  by bisection over prefix decodes, O(log L) decodes in all. "The prefix contains the caption" only turns from false
  to true as the prefix grows, so bisection returns the same k as the reference's scan. (Summing the lengths of
  per-token decodes would not: a byte-level token holding part of a multi-byte character decodes to U+FFFD alone.)

The module needs only `decode` and `convert_tokens_to_ids` from a tokenizer; `rewards/` does not import transformers.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from prism_mcore.record import Sample, SegmentBounds

CAPTION_OPEN, CAPTION_CLOSE = "<caption>", "</caption>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
RESPONSE_TAGS = (CAPTION_OPEN, CAPTION_CLOSE, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# The reference's validity regex (PRISM_SPEC §1), kept as the definition `match_response_format` is tested against.
RESPONSE_FORMAT_REGEX = re.compile(
    r"^\s*(<caption>.*?</caption>)\s*(<think>.*?</think>\s*<answer>.*?</answer>)\s*$", re.DOTALL
)

# Qwen-VL's vision markers, each with the model-config field that holds its id. A policy must never generate them:
# re-scoring a response that holds them would make the model look for image features that do not exist. (Qwen's
# `<|vision_pad|>` is not one: neither the processor nor the model reads it, and no config field names it.)
VISION_TOKENS = {
    "<|vision_start|>": "vision_start_token_id",
    "<|vision_end|>": "vision_end_token_id",
    "<|image_pad|>": "image_token_id",
    "<|video_pad|>": "video_token_id",
}

_WHITESPACE = re.compile(r"\s*")  # the regex's own `\s`, so both agree on every Unicode space


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def convert_tokens_to_ids(self, tokens: str) -> int | None: ...


@dataclass(frozen=True)
class FormatMatch:
    """The groups of `RESPONSE_FORMAT_REGEX` in a valid response."""

    caption: str  # group 1: `<caption>…</caption>`, tags included
    reasoning: str  # group 2: `<think>…</think>`, whitespace, `<answer>…</answer>`
    caption_end: int  # character offset just past the caption's `</caption>`


def _skip_whitespace(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def match_response_format(text: str) -> FormatMatch | None:
    """The match of `RESPONSE_FORMAT_REGEX` in `text`, or None; linear time.

    The regex's lazy groups backtrack in a fixed order, which pins its match down:
    - the answer's `</answer>` is the one that ends the text before trailing whitespace;
    - the think part only needs some `</think>` that is followed by whitespace and an `<answer>` with room for the
      final `</answer>`; the latest such one (`think_close`) serves every caption candidate that any one serves;
    - the caption ends at the first `</caption>` that is followed by whitespace, `<think>`, and `think_close` late enough
      to close that `<think>`.
    """
    start = _skip_whitespace(text, 0)
    end = len(text.rstrip())  # str.rstrip strips exactly the characters `\s` matches
    if not text.startswith(CAPTION_OPEN, start) or not text.endswith(ANSWER_CLOSE, 0, end):
        return None
    last_answer_open = end - len(ANSWER_CLOSE) - len(ANSWER_OPEN)

    think_close = -1  # start of the latest usable `</think>`
    pos = text.rfind(THINK_CLOSE, 0, last_answer_open)
    while pos >= 0:
        answer_open = _skip_whitespace(text, pos + len(THINK_CLOSE))
        if answer_open <= last_answer_open and text.startswith(ANSWER_OPEN, answer_open):
            think_close = pos
            break
        pos = text.rfind(THINK_CLOSE, 0, pos)

    pos = text.find(CAPTION_CLOSE, start + len(CAPTION_OPEN))
    while pos >= 0:
        caption_end = pos + len(CAPTION_CLOSE)
        think_open = _skip_whitespace(text, caption_end)
        if text.startswith(THINK_OPEN, think_open) and think_close >= think_open + len(THINK_OPEN):
            return FormatMatch(text[start:caption_end], text[think_open:end], caption_end)
        pos = text.find(CAPTION_CLOSE, pos + 1)
    return None


def single_token_id(tokenizer: Tokenizer, text: str) -> int | None:
    """The id of `text` if the vocabulary holds it as one token that decodes back to it, else None."""
    token_id = tokenizer.convert_tokens_to_ids(text)
    if token_id is None or tokenizer.decode([token_id]) != text:
        return None
    return token_id


def vision_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids of the `VISION_TOKENS` this tokenizer has."""
    ids = (single_token_id(tokenizer, token) for token in VISION_TOKENS)
    return frozenset(token_id for token_id in ids if token_id is not None)


def _bounds(caption_end: int, valid_length: int, format_valid: bool) -> SegmentBounds:
    # The CoT segment keeps at least one token (§1: an empty CoT segment is replaced by one token). A response of
    # fewer than two tokens cannot also give the caption one; it never matches the format, so its scores are zeroed.
    return SegmentBounds(max(0, min(caption_end, valid_length - 1)), valid_length, format_valid)


class ResponseSegmenter:
    """Decodes responses and splits them into caption and CoT segments (PRISM_SPEC §1).

    `eos_token_ids` end a response: its valid part runs up to and including the first of them (all tokens if none).
    A response whose valid part holds any of `forbidden_token_ids` is format-invalid whatever its text; they default to
    the tokenizer's `VISION_TOKENS`, and `()` disables the check.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        eos_token_ids: Collection[int],
        forbidden_token_ids: Collection[int] | None = None,
    ) -> None:
        if not eos_token_ids:
            raise ValueError("eos_token_ids is empty: a response's valid length is counted up to its first EOS")
        for tag in RESPONSE_TAGS:
            tag_id = single_token_id(tokenizer, tag)
            if tag_id is not None and tokenizer.decode([tag_id], skip_special_tokens=True) != tag:
                raise ValueError(
                    f"{tag!r} is a special token of this tokenizer: decoding with skip_special_tokens drops it, so no "
                    "response could match the PRISM format. Register the response tags as normal added tokens."
                )
        self._tokenizer = tokenizer
        self._eos_token_ids = frozenset(eos_token_ids)
        if forbidden_token_ids is None:
            forbidden_token_ids = vision_token_ids(tokenizer)
        self._forbidden_token_ids = frozenset(forbidden_token_ids)
        self._caption_close_id = single_token_id(tokenizer, CAPTION_CLOSE)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def segment(self, response_ids: Sequence[int]) -> tuple[SegmentBounds, str]:
        """The segment bounds of one response and its text (the valid part, decoded without special tokens)."""
        valid_length = next(
            (i + 1 for i, token_id in enumerate(response_ids) if token_id in self._eos_token_ids), len(response_ids)
        )
        valid_ids = list(response_ids[:valid_length])
        text = self._decode(valid_ids)
        match = match_response_format(text)
        if match is None or not self._forbidden_token_ids.isdisjoint(valid_ids):
            return _bounds(max(1, valid_length // 2), valid_length, False), text
        return _bounds(self._caption_end(valid_ids, match.caption), valid_length, True), text

    def segment_samples(self, samples: Iterable[Sample]) -> None:
        """Fill `response_text` and `segments` of each sample from its `response_ids`."""
        for sample in samples:
            sample.segments, sample.response_text = self.segment(sample.response_ids)

    def _caption_end(self, valid_ids: list[int], caption: str) -> int:
        """The smallest k such that `decode(valid_ids[:k])` contains `caption` (which `decode(valid_ids)` does)."""

        def prefix_contains_caption(k: int) -> bool:
            return caption in self._decode(valid_ids[:k])

        if self._caption_close_id is not None and self._caption_close_id in valid_ids:
            k = valid_ids.index(self._caption_close_id) + 1
            # Not the answer when the policy spelled an earlier `</caption>` with other tokens.
            if prefix_contains_caption(k) and not prefix_contains_caption(k - 1):
                return k
        low, high = 1, len(valid_ids)
        while low < high:
            middle = (low + high) // 2
            if prefix_contains_caption(middle):
                high = middle
            else:
                low = middle + 1
        return low
