"""The rollout interface every engine implements, and the sampling settings it takes.

A `RolloutEngine` turns a batch of prompt `Sample`s into `n` completed copies of each (PRISM_SPEC §4, §5.1: n = 16
responses per prompt), and takes the policy's new weights after every update. Two engines implement it:
`LocalEngine` (transformers, in the trainer process: the embedded default and tests) and `SGLangEngine` (HTTP to
SGLang servers: production).

Log-prob convention, shared by both engines and by SGLang 0.5.23: `rollout_logprobs[t]` is the log-probability of
the sampled token under the temperature-scaled distribution over the whole vocabulary,
`log_softmax(logits / temperature)[token]`, without the top-p/top-k renormalisation (greedy decoding reports
`log_softmax(logits)`). That is what the trainer recomputes (`algorithms.logprobs` with the same temperature), so
the two differ only by numerics and by the rollout engine's own kernels; `algorithms.mismatch` measures the gap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch

from prism_mcore.record import Sample
from prism_mcore.rewards.response_format import VISION_TOKENS

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from prism_mcore.config.schema import RolloutConfig

FinishReason = Literal["stop", "length"]

# SGLang treats temperatures below this as greedy decoding (temperature 1, top-k 1); so do we.
GREEDY_TEMPERATURE = 1e-6


class RolloutError(RuntimeError):
    """A rollout engine could not produce the completions it was asked for."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: `n` responses per prompt, each at most `max_new_tokens` long.

    `top_k = -1` and `top_p = 1.0` disable those filters; `temperature` below `GREEDY_TEMPERATURE` means greedy.
    Generation stops at `stop_token_ids` and at the engine's own end-of-sequence ids (`<|im_end|>`,
    `<|endoftext|>`); the stop token is part of the response. With `seed` set, a call is reproducible on the same
    engine and batch.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(token) for token in self.stop_token_ids))
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def logprob_temperature(self) -> float:
        """The temperature the reported log-probs are computed at (1 for greedy decoding, as SGLang does)."""
        return 1.0 if self.greedy else self.temperature

    @classmethod
    def from_config(
        cls, config: RolloutConfig, *, stop_token_ids: Sequence[int] = (), seed: int | None = None
    ) -> SamplingParams:
        """The training-time sampling settings of a run (PRISM_SPEC §4: temperature 1, top-p 1, top-k -1)."""
        return cls(
            n=config.n,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            max_new_tokens=config.max_new_tokens,
            stop_token_ids=tuple(stop_token_ids),
            seed=seed,
        )


def config_vision_token_ids(config: PretrainedConfig) -> tuple[int, ...]:
    """The ids of the vision markers (`rewards.response_format.VISION_TOKENS`) a Qwen-VL model config names: only
    the processor may place them, and a policy that samples one produces a response that cannot be re-scored
    ("Image features and image tokens do not match")."""
    ids = (getattr(config, field, None) for field in VISION_TOKENS.values())
    return tuple(int(token) for token in ids if token is not None)


def completed_sample(
    prompt: Sample,
    response_ids: Sequence[int],
    rollout_logprobs: Sequence[float],
    finish_reason: FinishReason,
    weight_version: int,
) -> Sample:
    """A copy of `prompt` carrying one response; the uid is kept, so the n responses to a prompt form a group."""
    if len(response_ids) != len(rollout_logprobs):
        raise RolloutError(
            f"sample {prompt.uid!r}: {len(response_ids)} response tokens but {len(rollout_logprobs)} log-probs"
        )
    return replace(
        prompt,
        response_ids=[int(token) for token in response_ids],
        rollout_logprobs=[float(logprob) for logprob in rollout_logprobs],
        finish_reason=finish_reason,
        weight_version=weight_version,
        # The copies share the (read-only) prompt fields but must not share this mutable dict.
        extra_info=dict(prompt.extra_info),
    )


class RolloutEngine(ABC):
    """Samples responses for multimodal prompts and follows the policy's weights.

    Engines implement the memory hooks and `close` as no-ops where they mean nothing.
    """

    @property
    @abstractmethod
    def weight_version(self) -> int:
        """The version of the weights completions are currently sampled from."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sample], params: SamplingParams) -> list[Sample]:
        """`params.n` completed copies of every prompt, prompt by prompt (the n copies of a prompt are adjacent),
        each with response ids, rollout log-probs, finish reason and the weight version that produced it."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new policy weights, given as a stream of (HF parameter name, tensor), and label them `version`.

        Completions generated afterwards carry `version`; the stream is consumed once, so an exporter can produce
        the tensors one by one without holding the whole model.
        """

    @abstractmethod
    def release_memory(self) -> None:
        """Free accelerator memory for training (colocated mode); `resume_memory` must precede the next generate."""

    @abstractmethod
    def resume_memory(self) -> None:
        """Take back the memory `release_memory` freed."""

    @abstractmethod
    def close(self) -> None:
        """Release connections, threads and processes the engine holds."""
