"""LocalEngine: rollouts from a transformers Qwen3-VL model in the calling process.

The embedded default and the tests use it in the trainer process, fed the policy's weights after every update by the
streaming HF export; the project's SGLang-protocol server wraps it; it also runs on a GPU.

Sampling is transformers' `generate` over a left-padded batch with a KV cache (it computes Qwen3-VL's 3-D MRoPE
positions, left padding included), with every knob set from `SamplingParams`: temperature, then top-k, then top-p,
applied to the logits. One logits processor, `SampledTokenLogProbs`, runs first on the raw logits of every step: it
keeps that step's `log_softmax(logits / temperature)` (the convention of `rollout.base`) until the sampled token is
known, and then suppresses the vision placeholder ids (`<|image_pad|>`, `<|vision_start|>`, `<|vision_end|>`,
`<|video_pad|>`), since a response containing one cannot be re-scored. The suppression and the top-p/top-k filters
thus only restrict which tokens can be drawn; the reported log-probs are over the whole vocabulary, as SGLang reports
them and as the trainer recomputes them. Only one step's distribution is held at a time, not `[batch, steps, vocab]`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from prism_mcore.record import Sample
from prism_mcore.rollout.base import (
    FinishReason,
    RolloutEngine,
    RolloutError,
    SamplingParams,
    completed_sample,
    config_vision_token_ids,
)

# Qwen's end-of-turn and end-of-text tokens: Qwen3-VL's generation config stops at both (PRISM_SPEC §8.3).
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


class GenerationCancelled(RolloutError):
    """`generate` stopped because its `cancelled` callback said so (the server's client went away)."""


class _StopWhenCancelled(StoppingCriteria):
    """Ends every row of a `model.generate` call once `cancelled()` is true; asked once per decoding step."""

    def __init__(self, cancelled: Callable[[], bool]) -> None:
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancelled(), dtype=torch.bool, device=input_ids.device)


class SampledTokenLogProbs(LogitsProcessor):
    """Records the log-prob of each sampled token under `log_softmax(raw logits / temperature)`, then masks
    `suppress_token_ids` out of the logits the sampler sees.

    `generate` calls logits processors before it samples a step's token, so each step's log-probs are kept until
    the next call, whose `input_ids` end with that token; `sampled_logprobs` gathers the last step's.
    """

    def __init__(self, temperature: float, suppress_token_ids: Sequence[int]) -> None:
        self.temperature = temperature
        self.suppress_token_ids = list(suppress_token_ids)
        self._last_step: torch.Tensor | None = None  # [batch, vocab] log-probs of the step whose token is pending
        self._gathered: list[torch.Tensor] = []  # one [batch] tensor per step whose token is known

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last_step is not None:
            self._gathered.append(self._last_step.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._last_step = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.suppress_token_ids:
            scores = scores.clone()
            scores[:, self.suppress_token_ids] = -float("inf")
        return scores

    def sampled_logprobs(self, response_tokens: torch.Tensor) -> torch.Tensor:
        """[batch, steps] log-probs of the generated `response_tokens` ([batch, steps])."""
        steps = list(self._gathered)
        if self._last_step is not None:
            steps.append(self._last_step.gather(-1, response_tokens[:, -1:]).squeeze(-1))
        if len(steps) != response_tokens.shape[1]:
            raise RolloutError(f"recorded {len(steps)} sampling steps for {response_tokens.shape[1]} generated tokens")
        return torch.stack(steps, dim=1)


class LocalEngine(RolloutEngine):
    """In-process rollouts from a transformers image-text-to-text model (Qwen3-VL).

    Not thread-safe: callers that share one engine between threads (the SGLang-protocol server) serialise calls.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        suppress_token_ids: Sequence[int] | None = None,
        max_batch_size: int = 64,
        weight_version: int = 0,
    ) -> None:
        if not eos_token_ids:
            raise ValueError("LocalEngine needs at least one end-of-sequence token id")
        self.model = model.eval()
        # A checkpoint's recommended sampling settings (Qwen's generation_config.json sets top_k=20, top_p=0.8, ...)
        # would otherwise fill every setting left unset here; rollouts take theirs from SamplingParams only.
        self.model.generation_config = GenerationConfig()
        self.device = next(model.parameters()).device
        self.eos_token_ids = tuple(int(token) for token in eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        if suppress_token_ids is None:
            suppress_token_ids = config_vision_token_ids(model.config)
        self.suppress_token_ids = tuple(int(token) for token in suppress_token_ids)
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.max_batch_size = max_batch_size
        self._weight_version = weight_version
        self._memory_released = False

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 64,
        weight_version: int = 0,
    ) -> LocalEngine:
        """An engine over the HF checkpoint folder `path` (model and tokenizer, no network access).

        The end-of-sequence ids are the tokenizer's `<|im_end|>` and `<|endoftext|>`, with the checkpoint's
        generation-config eos ids; padding uses the tokenizer's pad token.
        """
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        vocab = tokenizer.get_vocab()
        eos_ids = [vocab[token] for token in EOS_TOKENS if token in vocab]
        config_eos = model.generation_config.eos_token_id
        config_eos = [] if config_eos is None else [config_eos] if isinstance(config_eos, int) else list(config_eos)
        eos_ids += [token for token in config_eos if token not in eos_ids]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        return cls(
            model,
            eos_token_ids=eos_ids,
            pad_token_id=pad_id,
            max_batch_size=max_batch_size,
            weight_version=weight_version,
        )

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def generate(
        self, prompts: Sequence[Sample], params: SamplingParams, cancelled: Callable[[], bool] | None = None
    ) -> list[Sample]:
        """As `RolloutEngine.generate`; `cancelled`, asked between decoding steps, ends the call early with
        `GenerationCancelled` (the project's server passes "has the client disconnected")."""
        if self._memory_released:
            raise RolloutError("the engine's memory is released; call resume_memory() before generating")
        for sample in prompts:
            self._check_prompt(sample)
        rows = [prompt for prompt in prompts for _ in range(params.n)]
        stop_ids = tuple(dict.fromkeys(self.eos_token_ids + params.stop_token_ids))
        if params.seed is None:  # draws from (and advances) the process's generators: another call, other samples
            return self._generate_rows(rows, params, stop_ids, cancelled)
        # A seed makes the whole call reproducible without disturbing the caller's random state.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(params.seed)
            return self._generate_rows(rows, params, stop_ids, cancelled)

    def _generate_rows(
        self,
        rows: list[Sample],
        params: SamplingParams,
        stop_ids: tuple[int, ...],
        cancelled: Callable[[], bool] | None = None,
    ) -> list[Sample]:
        completed: list[Sample] = []
        for start in range(0, len(rows), self.max_batch_size):
            completed += self._generate_batch(rows[start : start + self.max_batch_size], params, stop_ids, cancelled)
            if cancelled is not None and cancelled():
                raise GenerationCancelled("generation cancelled")
        return completed

    def _check_prompt(self, sample: Sample) -> None:
        if not sample.prompt_ids:
            raise RolloutError(f"sample {sample.uid!r} has an empty prompt")
        if self.image_token_id is not None and sample.image_inputs is None and self.image_token_id in sample.prompt_ids:
            raise RolloutError(f"sample {sample.uid!r} has image tokens in its prompt but no image_inputs")

    @torch.no_grad()
    def _generate_batch(
        self,
        rows: list[Sample],
        params: SamplingParams,
        stop_ids: tuple[int, ...],
        cancelled: Callable[[], bool] | None = None,
    ) -> list[Sample]:
        prompt_length = max(len(sample.prompt_ids) for sample in rows)
        input_ids = torch.full((len(rows), prompt_length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, sample in enumerate(rows):
            input_ids[row, prompt_length - len(sample.prompt_ids) :] = torch.tensor(sample.prompt_ids)
            attention_mask[row, prompt_length - len(sample.prompt_ids) :] = 1
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        with_images = [sample.image_inputs for sample in rows if sample.image_inputs is not None]
        if with_images:
            inputs["pixel_values"] = torch.cat([images.pixel_values for images in with_images]).to(self.model.dtype)
            inputs["image_grid_thw"] = torch.cat([images.image_grid_thw for images in with_images])
            # transformers 5 needs the modality of every position (0 text, 1 image) to build the MRoPE positions.
            inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        recorder = SampledTokenLogProbs(params.logprob_temperature, self.suppress_token_ids)
        # Greedy decoding takes no sampling settings (transformers warns about any it would ignore). top_k=0
        # disables top-k, where leaving it unset would mean transformers' default of 50.
        top_k = 0 if params.top_k == -1 else params.top_k
        sampling = {} if params.greedy else {"temperature": params.temperature, "top_k": top_k, "top_p": params.top_p}
        generation_config = GenerationConfig(
            do_sample=not params.greedy,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            **sampling,
        )
        output = self.model.generate(
            **{key: value.to(self.device) for key, value in inputs.items()},
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([recorder]),
            stopping_criteria=StoppingCriteriaList([_StopWhenCancelled(cancelled)] if cancelled else []),
        )
        tokens = output.sequences[:, prompt_length:]
        logprobs = recorder.sampled_logprobs(tokens).cpu()
        tokens = tokens.cpu()
        stop = torch.tensor(stop_ids)
        completed = []
        for row, sample in enumerate(rows):
            stop_positions = torch.isin(tokens[row], stop).nonzero()
            # generate pads a row after its stop token; the response runs up to and including that token.
            length = int(stop_positions[0]) + 1 if len(stop_positions) else tokens.shape[1]
            finish_reason: FinishReason = "stop" if len(stop_positions) else "length"
            completed.append(
                completed_sample(
                    sample,
                    tokens[row, :length].tolist(),
                    logprobs[row, :length].tolist(),
                    finish_reason,
                    self._weight_version,
                )
            )
        return completed

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy (HF name, tensor) pairs into the model in place; returns how many were loaded.

        Names are the checkpoint's (`model.language_model.layers.0.mlp.up_proj.weight`, ...); an unknown name or a
        shape mismatch raises before that tensor is copied. A subset of the parameters may be given, as SGLang
        allows (for example a frozen vision tower left out); tensors are cast to the model's dtype.
        """
        parameters = self.model.state_dict(keep_vars=True)
        loaded = 0
        for name, tensor in named_tensors:
            target = parameters.get(name)
            if target is None:
                raise KeyError(f"weight update names {name!r}, which the rollout model does not have")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"weight update for {name!r} has shape {tuple(tensor.shape)}, the model has {tuple(target.shape)}"
                )
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            loaded += 1
        return loaded

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.load_weights(named_tensors)
        self._weight_version = version

    def release_memory(self) -> None:
        """Offload the weights to host memory when they live on an accelerator; on CPU only marks the state."""
        if self.device.type != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._memory_released = True

    def resume_memory(self) -> None:
        if self.device.type != "cpu":
            self.model.to(self.device)
        self._memory_released = False

    def close(self) -> None:
        """Nothing to release: the model is garbage-collected with the engine."""
