"""Multimodal sample building: records -> token ids, 3-D MRoPE positions, loss labels and scored segments.

What the policy and the discriminator are fed, for each stage:

- SFT (`sft_sequence`): the conversation rendered by the tokenizer's chat template, with PRISM's system prompt
  (PRISM_SPEC §1) when the conversation has none; labels on the assistant turns only (their text and `<|im_end|>`;
  the newline after it is context the model never generates), -100 elsewhere, any number of turns.
- Alignment/RL prompts (`prompt_sample`): a `record.Sample` whose `prompt_ids` end with `<|im_start|>assistant\\n`;
  `policy_sequence` appends a rollout's response, with labels on the response.
- Discriminator segments (PRISM_SPEC §2.3, Decisions 1-3): `[prompt ids] + segment`, scored at the last token. A
  teacher caption is its text without trailing whitespace, so the last token is the end of `</caption>`; a teacher
  CoT is its text plus `<|im_end|>`, scored there. Segments are limited by the configured max response length, not
  512 (Decision 1). Student segments cut the same way from a rollout with its `SegmentBounds`; warmup pairs
  (PRISM_SPEC §2.5) use the same rule for both sides, so warmup and alignment score the same kind of input.

Each `<|image_pad|>` of the rendered text becomes `t*h*w / merge_size**2` copies, from the image's `image_grid_thw`.
Positions are Qwen3-VL's 3-D MRoPE ids, the same as transformers' `Qwen3VLModel.get_rope_index`, in every stage
(Decision 2). Length limits: prompts longer than `max_prompt_length` are always dropped (a cut question no longer
matches its answer); SFT sequences and teacher segments are dropped (`over_length="filter"`) or cut
(`"truncate"`), and `DataStats` counts both.

`PromptSet` holds a prompt file's usable rows and builds each `Sample` (token ids, processed images) when a step asks
for it, so the memory a stage holds for its prompts is that of a batch, not of the file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, overload

import torch
from transformers import PreTrainedTokenizerBase

from prism_mcore.config.schema import OverLength
from prism_mcore.data.errors import IMAGE_COUNT_MISMATCH, TOO_LONG, DataError, DataStats, OnError, checked, located
from prism_mcore.data.images import ImageProcessor
from prism_mcore.data.prompts import IMAGE_PLACEHOLDER, SYSTEM_PROMPT
from prism_mcore.data.readers import (
    ChatMessage,
    PromptRecord,
    RecordReader,
    SegmentKind,
    SftExample,
    WarmupExample,
)
from prism_mcore.record import ImageInputs, Sample

IGNORE_INDEX = -100  # label of tokens without a loss (PyTorch's cross-entropy ignore index)
IMAGE_PAD = "<|image_pad|>"
EOS = "<|im_end|>"  # ends every turn; the policy's stop token and the CoT segment's scored token
PAD = "<|endoftext|>"


@dataclass
class TokenSequence:
    """One sequence ready for a model forward (unbatched)."""

    input_ids: torch.Tensor  # [L] int64
    position_ids: torch.Tensor  # [3, L] int64: MRoPE (temporal, height, width) rows
    labels: torch.Tensor | None = None  # [L] int64: the token where a loss applies, IGNORE_INDEX elsewhere (unshifted)
    image_inputs: ImageInputs | None = None
    score_index: int | None = None  # discriminator segments: the token whose head output is the score

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class SegmentPair:
    """A teacher and a student segment of the same kind, sharing prompt and image: one discriminator comparison."""

    kind: SegmentKind
    teacher: TokenSequence
    student: TokenSequence


@dataclass
class LengthLimits:
    """Token limits and the over-length policy."""

    max_prompt_length: int = 2048
    max_segment_length: int = 6144  # teacher caption/CoT and warmup segments (Decision 1)
    max_sequence_length: int = 8192  # SFT conversations, prompt and targets together
    over_length: OverLength = "filter"


def mrope_position_ids(
    input_ids: Sequence[int] | torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    image_token_id: int,
    spatial_merge_size: int,
) -> torch.Tensor:
    """Qwen3-VL's 3-D rotary positions `[3, L]` for one unpadded sequence.

    Text tokens advance all three rows together. The `t*h*w/m**2` tokens of an image (in `image_grid_thw` order)
    start at the next position p and get (p + frame, p + row, p + column) on the merged grid; the text after the
    image resumes at p + max(rows, columns).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    positions = torch.empty(3, ids.shape[0], dtype=torch.long)
    image_token_indices = (ids == image_token_id).nonzero().flatten().tolist()
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    cursor = 0  # next token index to assign
    next_position = 0
    used_image_tokens = 0
    for frames, grid_h, grid_w in grids:
        rows, columns = grid_h // spatial_merge_size, grid_w // spatial_merge_size
        count = frames * rows * columns
        if used_image_tokens + count > len(image_token_indices):
            raise ValueError(f"image_grid_thw needs more than the {len(image_token_indices)} image tokens present")
        start = image_token_indices[used_image_tokens]
        if image_token_indices[used_image_tokens + count - 1] != start + count - 1:
            raise ValueError(f"the {count} tokens of an image at index {start} are not contiguous")
        positions[:, cursor:start] = torch.arange(start - cursor) + next_position
        next_position += start - cursor
        image = slice(start, start + count)
        positions[0, image] = next_position + torch.arange(frames).repeat_interleave(rows * columns)
        positions[1, image] = next_position + torch.arange(rows).repeat_interleave(columns).repeat(frames)
        positions[2, image] = next_position + torch.arange(columns).repeat(frames * rows)
        next_position += max(rows, columns)
        cursor = start + count
        used_image_tokens += count
    if used_image_tokens != len(image_token_indices):
        raise ValueError(f"{len(image_token_indices)} image tokens but image_grid_thw accounts for {used_image_tokens}")
    positions[:, cursor:] = torch.arange(ids.shape[0] - cursor) + next_position
    return positions


class SampleBuilder:
    """Turns records into model inputs with one tokenizer (its chat template), one image pipeline and one policy."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        images: ImageProcessor,
        limits: LengthLimits,
        stats: DataStats | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.images = images
        self.limits = limits
        self.stats = stats if stats is not None else DataStats()
        self.image_token_id = self._token_id(IMAGE_PAD)
        self.eos_id = self._token_id(EOS)
        self.pad_id = self._token_id(PAD)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token; a Qwen3-VL tokenizer is required")
        return token_id

    # --- rendering ------------------------------------------------------------------------------------------

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool) -> str:
        """The chat template's text for `messages`, each `<image>` placeholder as an image item of a user turn."""
        chat: list[dict[str, Any]] = []
        for message in messages:
            if message.role == "user" and IMAGE_PLACEHOLDER in message.content:
                items: list[dict[str, str]] = []
                for index, text in enumerate(message.content.split(IMAGE_PLACEHOLDER)):
                    if index > 0:
                        items.append({"type": "image"})
                    if text:
                        items.append({"type": "text", "text": text})
                chat.append({"role": message.role, "content": items})
            else:
                chat.append({"role": message.role, "content": message.content})
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)

    @staticmethod
    def with_system_prompt(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """`messages`, preceded by PRISM's system prompt unless they have a system turn (PRISM_SPEC §1)."""
        if any(message.role == "system" for message in messages):
            return list(messages)
        return [ChatMessage("system", SYSTEM_PROMPT), *messages]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _expand_image_tokens(
        self, ids: list[int], labels: list[int], image_inputs: ImageInputs | None, field: str
    ) -> tuple[list[int], list[int]]:
        """Replace the i-th `<|image_pad|>` by as many copies as image i has merged patches (labels: ignored).

        `field` is the record field the text came from, which a count mismatch names.
        """
        grids = [] if image_inputs is None else image_inputs.image_grid_thw.tolist()
        pads = ids.count(self.image_token_id)
        if pads != len(grids):
            # One pad per image item is all the template writes; more means the text itself spells the token.
            message = f"the rendered text has {pads} {IMAGE_PAD} for {len(grids)} images"
            raise DataError(IMAGE_COUNT_MISMATCH, message, field=field)
        counts = iter(self.images.geometry.num_image_tokens(grid) for grid in grids)
        expanded_ids: list[int] = []
        expanded_labels: list[int] = []
        for token_id, label in zip(ids, labels, strict=True):
            if token_id == self.image_token_id:
                count = next(counts)
                expanded_ids += [token_id] * count
                expanded_labels += [IGNORE_INDEX] * count
            else:
                expanded_ids.append(token_id)
                expanded_labels.append(label)
        return expanded_ids, expanded_labels

    def _sequence(
        self,
        ids: list[int],
        image_inputs: ImageInputs | None,
        labels: list[int] | None = None,
        score_index: int | None = None,
    ) -> TokenSequence:
        grid = None if image_inputs is None else image_inputs.image_grid_thw
        merge = self.images.geometry.merge_size
        return TokenSequence(
            input_ids=torch.tensor(ids, dtype=torch.long),
            position_ids=mrope_position_ids(ids, grid, self.image_token_id, merge),
            labels=None if labels is None else torch.tensor(labels, dtype=torch.long),
            image_inputs=image_inputs,
            score_index=score_index,
        )

    # --- SFT ------------------------------------------------------------------------------------------------

    def _target_spans(self, messages: list[ChatMessage], text: str) -> list[tuple[int, int]]:
        """Character spans of `text` to train on: each assistant turn's content and its `<|im_end|>`.

        Found by rendering the conversation up to each assistant turn, which needs a template whose rendering of a
        prefix of the conversation is a prefix of the whole rendering (Qwen's is).
        """
        spans = []
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            start = len(self.render(messages[:index], add_generation_prompt=True))
            through = self.render(messages[: index + 1], add_generation_prompt=False)
            end = through.rfind(EOS) + len(EOS)
            if not text.startswith(through) or end <= start:
                raise ValueError("the chat template does not render conversations prefix by prefix; cannot mask")
            spans.append((start, end))
        return spans

    def sft_sequence(self, example: SftExample) -> TokenSequence:
        """The training sequence of one SFT conversation, labels on its assistant turns."""
        with located(example.origin.file, example.origin.row):
            messages = self.with_system_prompt(example.messages)
            text = self.render(messages, add_generation_prompt=False)
            ids: list[int] = []
            labels: list[int] = []
            cursor = 0
            # Each piece is tokenised on its own, so no token straddles a context/target boundary.
            for start, end in self._target_spans(messages, text):
                context_ids, target_ids = self.encode(text[cursor:start]), self.encode(text[start:end])
                ids += context_ids + target_ids
                labels += [IGNORE_INDEX] * len(context_ids) + target_ids
                cursor = end
            tail_ids = self.encode(text[cursor:])
            ids += tail_ids
            labels += [IGNORE_INDEX] * len(tail_ids)
            image_inputs = None
            if example.images:
                fields = [f"{example.images_column}[{index}]" for index in range(len(example.images))]
                image_inputs = self.images(example.images, fields)
            ids, labels = self._expand_image_tokens(ids, labels, image_inputs, example.messages_column)
            if len(ids) > self.limits.max_sequence_length:
                ids, labels = self._truncate_sft(ids, labels, example.messages_column)
        return self._sequence(ids, image_inputs, labels=labels)

    def _truncate_sft(self, ids: list[int], labels: list[int], field: str) -> tuple[list[int], list[int]]:
        limit = self.limits.max_sequence_length
        too_long = DataError(TOO_LONG, f"{len(ids)} tokens, over max_sequence_length={limit}", field=field)
        if self.limits.over_length == "filter":
            raise too_long
        # A cut must keep every image token (an image cannot be fed in part) and at least one target.
        if self.image_token_id in ids[limit:] or all(label == IGNORE_INDEX for label in labels[:limit]):
            raise too_long
        self.stats.truncated += 1
        return ids[:limit], labels[:limit]

    # --- alignment / RL prompts -----------------------------------------------------------------------------

    def _prompt(
        self, messages: list[ChatMessage], images: list[bytes], image_fields: Sequence[str] | None = None
    ) -> tuple[list[int], ImageInputs | None]:
        """Prompt ids (ending with the assistant header) and image inputs; over-long prompts are filtered.

        `image_fields` name the images in errors (by default `images[i]`).
        """
        ids = self.encode(self.render(self.with_system_prompt(messages), add_generation_prompt=True))
        image_inputs = self.images(images, image_fields) if images else None
        ids, _ = self._expand_image_tokens(ids, [IGNORE_INDEX] * len(ids), image_inputs, "prompt")
        limit = self.limits.max_prompt_length
        if len(ids) > limit:
            raise DataError(TOO_LONG, f"prompt is {len(ids)} tokens, over max_prompt_length={limit}", field="prompt")
        return ids, image_inputs

    def prompt_sample(self, record: PromptRecord, with_teacher: bool = True) -> Sample:
        """A `Sample` ready for rollout: prompt ids, image inputs, answers and (`with_teacher`) teacher texts.

        Teacher segments longer than `max_segment_length` filter the prompt out (a `TOO_LONG` skip, counted, never
        an abort) or count as truncated here, once per prompt; `teacher_segments` cuts them the same way. Without
        `with_teacher` (RL and evaluation prompts, which never use them) the teacher texts are dropped unchecked.
        """
        if not with_teacher:
            record = replace(record, teacher_caption=None, teacher_cot=None)
        with located(record.origin.file, record.origin.row):
            ids, image_inputs = self._prompt(record.messages, record.images)
            for kind, text in (("caption", record.teacher_caption), ("cot", record.teacher_cot)):
                if text is not None:
                    self.stats.truncated += self._text_segment_ids(kind, text, f"teacher_{kind}")[1]
        return Sample(
            uid=record.origin.uid,
            prompt_ids=ids,
            image_inputs=image_inputs,
            images=record.images,
            data_source=record.data_source,
            ground_truth=record.ground_truth,
            equivalent_answers=record.equivalent_answers,
            teacher_caption=record.teacher_caption,
            teacher_cot=record.teacher_cot,
            extra_info=record.extra_info,
        )

    def policy_sequence(self, sample: Sample) -> TokenSequence:
        """Prompt and response of a rollout, labels on the response tokens (the policy-gradient targets)."""
        labels = [IGNORE_INDEX] * len(sample.prompt_ids) + list(sample.response_ids)
        return self._sequence(sample.prompt_ids + list(sample.response_ids), sample.image_inputs, labels=labels)

    # --- discriminator segments -----------------------------------------------------------------------------

    def _text_segment_ids(self, kind: SegmentKind, text: str, field: str) -> tuple[list[int], bool]:
        """Token ids of a demonstration segment, and whether they were truncated.

        A caption ends at its last non-space character (the end of `</caption>`), where it is scored; a CoT or a
        whole response ends with `<|im_end|>`, which a cut keeps, so it is still the scored token.
        """
        limit = self.limits.max_segment_length
        if kind == "caption":
            ids, closing = self.encode(text.rstrip()), []
        else:
            ids, closing = self.encode(text), [self.eos_id]
        if len(ids) + len(closing) <= limit:
            return ids + closing, False
        if self.limits.over_length == "filter":
            message = f"{kind} segment is {len(ids) + len(closing)} tokens, over max_segment_length={limit}"
            raise DataError(TOO_LONG, message, field=field)
        return ids[: limit - len(closing)] + closing, True

    def _segment(self, prompt_ids: list[int], image_inputs: ImageInputs | None, segment: list[int]) -> TokenSequence:
        ids = prompt_ids + segment
        return self._sequence(ids, image_inputs, score_index=len(ids) - 1)

    def teacher_segments(self, sample: Sample) -> tuple[TokenSequence, TokenSequence]:
        """The discriminator's (caption, CoT) inputs for the teacher demonstration of `sample`'s prompt."""
        if sample.teacher_caption is None or sample.teacher_cot is None:
            raise ValueError(f"sample {sample.uid} has no teacher caption/CoT (alignment data needs them)")
        caption, _ = self._text_segment_ids("caption", sample.teacher_caption, "teacher_caption")
        cot, _ = self._text_segment_ids("cot", sample.teacher_cot, "teacher_cot")
        return (
            self._segment(sample.prompt_ids, sample.image_inputs, caption),
            self._segment(sample.prompt_ids, sample.image_inputs, cot),
        )

    def student_segments(self, sample: Sample) -> tuple[TokenSequence, TokenSequence]:
        """The discriminator's (caption, CoT) inputs for a rollout, cut at `sample.segments` (PRISM_SPEC §1).

        An empty CoT segment (possible only for an invalid response, whose scores are discarded) is replaced by
        the EOS token so that every sample still has a token to score.
        """
        if sample.segments is None:
            raise ValueError(f"sample {sample.uid} has no segment bounds; run the response segmentation first")
        bounds = sample.segments
        caption = list(sample.response_ids[: bounds.caption_end])
        cot = list(sample.response_ids[bounds.caption_end : bounds.valid_length]) or [self.eos_id]
        return (
            self._segment(sample.prompt_ids, sample.image_inputs, caption),
            self._segment(sample.prompt_ids, sample.image_inputs, cot),
        )

    # --- warmup pairs ---------------------------------------------------------------------------------------

    def warmup_pairs(self, example: WarmupExample) -> list[SegmentPair]:
        """The comparisons of one warmup line: prompt `[system, user=[image, prompt]]`, then each side's segment."""
        content = example.prompt
        if example.image is not None and IMAGE_PLACEHOLDER not in content:
            content = IMAGE_PLACEHOLDER + content  # the reference puts the image before the prompt text
        images = [] if example.image is None else [example.image]
        with located(example.origin.file, example.origin.row):
            prompt_ids, image_inputs = self._prompt([ChatMessage("user", content)], images, ["image"])
            pairs = []
            for pair in example.pairs:
                teacher, teacher_cut = self._text_segment_ids(pair.kind, pair.teacher, f"teacher_{pair.kind}")
                student, student_cut = self._text_segment_ids(pair.kind, pair.student, f"student_{pair.kind}")
                self.stats.truncated += teacher_cut + student_cut
                pairs.append(
                    SegmentPair(
                        pair.kind,
                        teacher=self._segment(prompt_ids, image_inputs, teacher),
                        student=self._segment(prompt_ids, image_inputs, student),
                    )
                )
        return pairs


class PromptSet(Sequence[Sample]):
    """The usable prompts of one file as `Sample`s built on access, so memory is O(batch), not O(file).

    `validate` (or a list of `rows` validated elsewhere, e.g. on another rank) decides which rows are usable: every
    row is built once under the data policy, counted in the builder's `DataStats` and dropped, so the usable rows and
    the counts by reason are exactly those of an eager build. `prompts[i]` then builds the i-th usable prompt again
    (a deterministic function of the row), with a builder of its own so nothing is counted twice. Without
    `with_teacher` (RL and evaluation prompts) the teacher texts are dropped unchecked (`prompt_sample`).
    """

    def __init__(
        self,
        reader: RecordReader[PromptRecord],
        builder: SampleBuilder,
        rows: Sequence[int],
        with_teacher: bool = True,
    ) -> None:
        self.reader = reader
        self.rows = list(rows)
        self.with_teacher = with_teacher
        self._builder = SampleBuilder(builder.tokenizer, builder.images, builder.limits, DataStats())

    @classmethod
    def validate(
        cls,
        reader: RecordReader[PromptRecord],
        builder: SampleBuilder,
        on_error: OnError,
        check: Callable[[Sample], None] | None = None,
        with_teacher: bool = True,
    ) -> PromptSet:
        """The usable rows of `reader` under `on_error`, counted in `builder.stats`; `check` may refuse a built
        sample with a `DataError` (e.g. a `data_source` without a reward judge)."""

        def usable(index: int) -> int:
            record = reader[index]
            sample = builder.prompt_sample(record, with_teacher=with_teacher)
            if check is not None:
                with located(record.origin.file, record.origin.row):
                    check(sample)
            return index

        rows = list(checked(range(len(reader)), usable, on_error, builder.stats))
        return cls(reader, builder, rows, with_teacher)

    def head(self, count: int) -> PromptSet:
        """The first `count` usable prompts (all when `count` is 0)."""
        return PromptSet(self.reader, self._builder, self.rows[: count or None], self.with_teacher)

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self._builder.prompt_sample(self.reader[row], self.with_teacher) for row in self.rows[index]]
        return self._builder.prompt_sample(self.reader[self.rows[index]], self.with_teacher)
