"""The embedded default's tokenizer: a small byte-level BPE in Qwen3-VL's layout, trained on the synthetic task.

It is a real `Qwen2Tokenizer` (the class Qwen3-VL checkpoints name), with Qwen's pre-tokenizer (digits split one by
one, NFC normalisation, byte-level BPE), the Qwen special tokens appended after the BPE vocabulary in Qwen's order,
and the six PRISM response tags as added *non-special* tokens, as `<think>`/`</think>` are in Qwen3: each is one
token, and they survive `decode(..., skip_special_tokens=True)`, which the PRISM validity regex is applied to.
The chat template renders Qwen3-VL's `<|im_start|>role\\n...<|im_end|>\\n` turns with images as
`<|vision_start|><|image_pad|><|vision_end|>`; eos is `<|im_end|>`, pad is `<|endoftext|>`.

The BPE is trained on a fixed sample of the task's own conversations, independent of the build's split sizes, so
every build (the default and the small ones tests make) has the same vocabulary. The vocabulary that sample
supports (a few hundred words, digits kept single) sets the size: `VOCAB_SIZE` in all, a multiple of 128 so model
parallel vocabulary padding has nothing to add.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Tokenizer

from prism_mcore.rewards.response_format import RESPONSE_TAGS

# Qwen2/3's special tokens, in their vocabulary order (151643 ... 151656 in the released models).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 640  # BPE vocabulary + special tokens + response tags
MODEL_MAX_LENGTH = 4096

# Qwen2's pre-tokenization pattern: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}"
    "{{- message.content -}}"
    "{%- else -%}"
    "{%- for item in message.content -%}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}"
    "{{- item.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_TAG_PATTERN = re.compile("|".join(re.escape(tag) for tag in RESPONSE_TAGS))


def train_tokenizer(corpus: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Qwen2Tokenizer:
    """Train the BPE on `corpus` (plain text, tags and all) and wrap it as a Qwen2Tokenizer."""
    added = len(SPECIAL_TOKENS) + len(RESPONSE_TAGS)
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - added,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # The tags become single added tokens, which are split off before the BPE sees any text: train without them.
    backend.train_from_iterator((_TAG_PATTERN.sub("\n", text) for text in corpus), trainer)
    if backend.get_vocab_size() != vocab_size - added:
        raise ValueError(
            f"the corpus supports only {backend.get_vocab_size()} BPE tokens, fewer than the {vocab_size - added} "
            f"needed for a vocabulary of {vocab_size}: lower the vocabulary size or widen the corpus"
        )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in RESPONSE_TAGS])
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        # As in Qwen's tokenizer config: every special token but the pad token is listed as an extra one.
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t != PAD_TOKEN],
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a folder (a tokenizer, processor or checkpoint folder), without network access."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the special tokens and response tags, keyed by token."""
    return {token: tokenizer.convert_tokens_to_ids(token) for token in (*SPECIAL_TOKENS, *RESPONSE_TAGS)}
