"""Megatron forward steps of the four losses, and the micro-batches they consume.

Every stage trains through `training.step.train_step`, which runs a `forward_step(data_iterator, model)` per
micro-batch. This module holds those forward steps, one per loss, each returning the `(numerator, denominator,
metrics)` triple the step divides once over all micro-batches and data-parallel ranks:

| forward step            | loss                                             | numerator / denominator                     |
|-------------------------|--------------------------------------------------|---------------------------------------------|
| `sft_forward`           | -log p of assistant tokens (SFT)                 | token sum / token count (global token mean) |
| `policy_forward`        | clipped policy loss (PRISM_SPEC §4, §5.2)        | see `policy_loss_fraction`                  |
| `discriminator_forward` | pairwise BT + fallback + L2 (PRISM_SPEC §3.1)    | micro-batch loss x samples / samples        |
| `warmup_forward`        | pairwise BT + router aux loss (PRISM_SPEC §2.5)  | micro-batch loss x pairs / pairs            |

"x samples / samples" reproduces the reference's scaling of each micro-batch loss by micro/mini batch size. Metrics
are `[sum, count]` pairs, so the reported value is the mean over the whole step. Inputs are packed batches (THD):
per-token tensors are `[1, T]` and aligned so that position t carries what the model predicts after token t.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_model_config
from prism_kernels.discriminator_loss import fused_discriminator_loss
from torch.nn.utils.rnn import pad_sequence

from prism_mcore.algorithms import (
    DiscriminatorLossConfig,
    LossAggregation,
    PolicyLossConfig,
    logprob_mismatch,
    masked_mean,
    pairwise_warmup_loss,
    policy_loss,
)
from prism_mcore.data.batching import PackedBatch
from prism_mcore.models import (
    forward_kwargs,
    padding_token_id,
    record_eval_scores,
    record_router_logits,
    router_load_balancing_loss,
    token_multiple,
)
from prism_mcore.training.logprobs import LogProbRequest, logprobs_output_processor

LossTriple = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _pair(value: torch.Tensor | float, count: int | float) -> torch.Tensor:
    """A `[sum, count]` metric entry for a value averaged over `count` items."""
    value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    return torch.stack([value * count, torch.tensor(float(count), dtype=torch.float64)])


def _count(value: int | float, like: torch.Tensor) -> torch.Tensor:
    """A loss denominator on the loss's device (Megatron all-reduces it with the numerators)."""
    return torch.tensor(value, dtype=torch.int, device=like.device)


# --------------------------------------------------------------------------------------------------------------------
# Policy micro-batches: SFT and RL
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenBatch:
    """A packed policy micro-batch and its per-token training targets (all `[1, T]`)."""

    packed: PackedBatch
    targets: torch.Tensor  # id of the next token of the same sequence
    loss_mask: torch.Tensor  # bool: positions whose next token is trained (assistant / response tokens)
    advantages: torch.Tensor | None = None  # RL: the sequence's advantage on each of its response positions
    rollout_logprobs: torch.Tensor | None = None  # RL: the rollout engine's log-prob of each response token
    # [P] int64: the positions of `loss_mask` (at least one): the only ones whose log-probs are computed
    loss_positions: torch.Tensor | None = None
    # RL with several updates per rollout: log pi_old of each response token, from the no-grad pass that
    # `record_old_logprobs` runs before the first update; None: the forward's own log-probs, detached (one update)
    old_logprobs: torch.Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return self.packed.num_sequences

    def filler(self) -> TokenBatch:
        """One sequence of two tokens with one loss position, for a data-parallel rank to run at a zero loss
        (`Filler`)."""
        packed = self.packed.filler(sequences=1, length=2)
        targets, _ = packed.next_token_targets()
        zeros = torch.zeros(1, 2)
        return TokenBatch(
            packed,
            targets,
            loss_mask=torch.tensor([[True, False]]),
            advantages=None if self.advantages is None else zeros,
            rollout_logprobs=None if self.rollout_logprobs is None else zeros.clone(),
            old_logprobs=None if self.old_logprobs is None else zeros.clone(),
            loss_positions=torch.tensor([0]),
        )


def token_batch(
    packed: PackedBatch,
    advantages: list[float] | None = None,
    rollout_logprobs: list[list[float]] | None = None,
) -> TokenBatch:
    """Targets and masks of a packed batch whose `labels` mark the trained tokens.

    For RL, `advantages[i]` is broadcast over sequence i's response positions (PRISM_SPEC §4 step 5) and
    `rollout_logprobs[i]` (one per response token) is placed where that token is predicted.
    """
    targets, valid = packed.next_token_targets()
    loss_mask = packed.next_token_labels().ne(-100) & valid
    adv = rollout = None
    if advantages is not None:
        adv = torch.zeros(loss_mask.shape, dtype=torch.float32)
        rollout = torch.zeros(loss_mask.shape, dtype=torch.float32) if rollout_logprobs is not None else None
        for i, (start, end) in enumerate(
            zip(packed.cu_seqlens[:-1].tolist(), packed.cu_seqlens[1:].tolist(), strict=True)
        ):
            positions = loss_mask[0, start:end].nonzero().flatten() + start
            adv[0, positions] = float(advantages[i])
            if rollout is not None:
                if len(rollout_logprobs[i]) != len(positions):
                    raise ValueError(
                        f"sequence {i}: {len(rollout_logprobs[i])} rollout log-probs for {len(positions)} tokens"
                    )
                rollout[0, positions] = torch.tensor(rollout_logprobs[i], dtype=torch.float32)
    positions = loss_mask[0].nonzero().flatten()
    return TokenBatch(packed, targets, loss_mask, adv, rollout, positions if len(positions) else torch.tensor([0]))


def sequence_rows(
    values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each sequence's masked positions of a `[1, T]` tensor into right-padded rows `[n, L]` (+ row mask).

    The policy loss works on `[batch, response length]` rows (sequence-level ratios and per-sequence aggregation
    need them); this is the packed-to-rows view of the response tokens.
    """
    rows = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        rows.append(values[0, start:end][mask[0, start:end]])
    padded = pad_sequence(rows, batch_first=True)
    lengths = torch.tensor([len(row) for row in rows], device=values.device)
    row_mask = torch.arange(padded.shape[1], device=values.device)[None, :] < lengths[:, None]
    return padded, row_mask


def _on_device(batch: Any, device: torch.device) -> Any:
    """A copy of a micro-batch dataclass with every tensor (including a nested PackedBatch's) on `device`."""
    moved = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
        elif dataclasses.is_dataclass(value):
            value = _on_device(value, device)
        moved[field.name] = value
    return dataclasses.replace(batch, **moved)


def _padded(batch: Any, config: TransformerConfig) -> Any:
    """`batch` with its packed tokens padded to the multiple the model's layout needs (`models.token_multiple`);
    a `TokenBatch`'s per-token tensors are padded alike, with no loss on the padding."""
    packed = batch if isinstance(batch, PackedBatch) else batch.packed
    padded = packed.padded_to_multiple(token_multiple(config), padding_token_id(config))
    if padded is packed:
        return batch
    if isinstance(batch, PackedBatch):
        return padded
    extra = padded.num_tokens - packed.num_tokens
    per_token = {}
    if isinstance(batch, TokenBatch):
        for name in ("targets", "loss_mask", "advantages", "rollout_logprobs", "old_logprobs"):
            value = getattr(batch, name)
            per_token[name] = None if value is None else torch.nn.functional.pad(value, (0, extra))
    return dataclasses.replace(batch, packed=padded, **per_token)


def _prepare(batch: Any, model: torch.nn.Module) -> Any:
    """A micro-batch ready for `model`: on its device, padded for its layout."""
    batch = _on_device(batch, next(model.parameters()).device)
    return _padded(batch, get_model_config(model))


def _policy_forward_output(model: torch.nn.Module, batch: TokenBatch, temperature: float) -> Any:
    """`(logprobs, entropy)` `[1, T]`, computed only at the loss positions (zero elsewhere)."""
    return model(
        **forward_kwargs(batch.packed),
        output_processor=logprobs_output_processor,
        output_processor_context=LogProbRequest(batch.targets, temperature=temperature, positions=batch.loss_positions),
    )


def sft_forward(data_iterator: Iterator[TokenBatch], model: torch.nn.Module) -> tuple[Any, Callable]:
    """Negative log-likelihood of the assistant tokens, as a global token mean."""
    batch = _prepare(next(data_iterator), model)
    output = _policy_forward_output(model, batch, temperature=1.0)

    def loss_func(output: tuple[torch.Tensor, torch.Tensor]) -> LossTriple:
        logprobs, _ = output
        mask = batch.loss_mask.to(logprobs.dtype)
        total = -(logprobs * mask).sum()
        tokens = int(batch.loss_mask.sum())
        return total, _count(tokens, total), {"loss": _pair(total / max(tokens, 1), tokens)}

    return output, loss_func


def policy_forward(
    loss_config: PolicyLossConfig, temperature: float = 1.0
) -> Callable[[Iterator[TokenBatch], torch.nn.Module], tuple[Any, Callable]]:
    """The clipped policy-gradient loss on rollouts.

    The old policy of PPO is the policy that the rollout batch's updates start from. With one optimizer step per
    rollout batch (the released setting, PRISM_SPEC §3.2, §5.1) those are exactly the weights this forward runs on,
    since every micro-batch of the step is computed before the step: `old_log_probs` is then the detached current
    log-prob, identical to what a separate recomputation pass would give, without that pass. With several updates per
    rollout (`training.updates.policy_updates`) the batch carries `old_logprobs` from a no-grad pass before the first
    update, and the ratio departs from 1 from the second update on.
    """

    def forward_step(data_iterator: Iterator[TokenBatch], model: torch.nn.Module) -> tuple[Any, Callable]:
        batch = _prepare(next(data_iterator), model)
        output = _policy_forward_output(model, batch, temperature)

        def loss_func(output: tuple[torch.Tensor, torch.Tensor]) -> LossTriple:
            logprobs, entropy = output
            cu = batch.packed.cu_seqlens
            log_probs, mask = sequence_rows(logprobs, batch.loss_mask, cu)
            advantages, _ = sequence_rows(batch.advantages, batch.loss_mask, cu)
            rollout = old = None
            if batch.rollout_logprobs is not None:
                rollout, _ = sequence_rows(batch.rollout_logprobs, batch.loss_mask, cu)
            if batch.old_logprobs is not None:
                old, _ = sequence_rows(batch.old_logprobs, batch.loss_mask, cu)
            numerator, denominator, result = policy_loss_fraction(
                log_probs, advantages, mask, loss_config, rollout_log_probs=rollout, old_log_probs=old
            )
            n = batch.num_sequences
            metrics = {name: _pair(value, n) for name, value in result.metrics.items()}
            metrics["pg_loss"] = _pair(result.loss, n)
            metrics["entropy"] = _pair(masked_mean(entropy.detach(), batch.loss_mask.float()), n)
            if rollout is not None:
                trainer = log_probs.detach() if old is None else old  # pi_old: the weights that sampled
                mismatch = logprob_mismatch(trainer, rollout, mask, tis_cap=loss_config.tis_cap)
                metrics.update({name: _pair(value, n) for name, value in mismatch.metrics().items()})
            return numerator, denominator, metrics

        return output, loss_func

    return forward_step


def policy_loss_fraction(
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    rollout_log_probs: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(numerator, denominator, loss output) of one micro-batch of `[n, L]` rows; `old_log_probs` defaults to
    `log_probs` detached (one update per rollout batch: the ratio is 1).

    `global-token-mean`: (Σ L·mask, number of tokens), so the step divides by all tokens of all micro-batches and
    ranks. Other modes follow the reference: the micro-batch's aggregated loss weighted by its sequences,
    (loss · n, n), which divides to Σ_mb loss_mb · n_mb / N.
    """
    old_log_probs = log_probs.detach() if old_log_probs is None else old_log_probs.to(log_probs.dtype)
    if config.aggregation is LossAggregation.GLOBAL_TOKEN_MEAN:
        result = policy_loss(
            log_probs,
            old_log_probs,
            advantages,
            mask,
            config,
            rollout_log_probs=rollout_log_probs,
            global_token_count=1,
        )
        return result.loss, _count(int(mask.sum()), result.loss), result
    result = policy_loss(log_probs, old_log_probs, advantages, mask, config, rollout_log_probs=rollout_log_probs)
    n = log_probs.shape[0]
    return result.loss * n, _count(n, result.loss), result


def old_logprobs_forward(
    temperature: float = 1.0,
) -> Callable[[Iterator[TokenBatch], torch.nn.Module], tuple[Any, Callable]]:
    """A no-grad pass that stores each micro-batch's log-probs at its loss positions as its `old_logprobs` (`[1, T]`,
    on the host, the micro-batch's own length): log pi_old before the first of several updates per rollout batch.

    The log-probs exist on the last pipeline stage only, which is the only stage whose loss reads them. The loss is
    zero and there are no metrics: the pass computes nothing else.
    """

    def forward_step(data_iterator: Iterator[TokenBatch], model: torch.nn.Module) -> tuple[Any, Callable]:
        unprepared = next(data_iterator)
        batch = _prepare(unprepared, model)
        output = _policy_forward_output(model, batch, temperature)

        def loss_func(output: tuple[torch.Tensor, torch.Tensor]) -> LossTriple:
            logprobs, _ = output
            length = unprepared.packed.num_tokens  # without the layout's padding
            unprepared.old_logprobs = logprobs[:, :length].detach().float().cpu()
            zero = logprobs.sum() * 0
            return zero, _count(0, zero), {}

        return output, loss_func

    return forward_step


# --------------------------------------------------------------------------------------------------------------------
# Discriminator micro-batches: alignment update (which also scores), warmup
# --------------------------------------------------------------------------------------------------------------------


def _token_scores(model: torch.nn.Module, packed: PackedBatch) -> torch.Tensor:
    """The value head's output at every token, `[1, T, 1]` (the last pipeline stage; hidden states elsewhere)."""
    return model(**forward_kwargs(packed))


def _read_scores(token_scores: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """The score of each sequence, read at its scored token: `[num_sequences]`."""
    return token_scores[0, packed.score_indices, 0].float()


@dataclass
class DiscriminatorBatch:
    """One alignment micro-batch of D: m student samples (whole prompt groups) and their k prompts' teachers.

    `packed` holds, in order, the m student captions, the m student CoTs, the k teacher captions and the k teacher
    CoTs. A teacher segment is the same for every sample of its prompt, so it is scored once and shared through
    `teacher_index` (sample -> prompt); the gradients equal those of scoring it once per sample.
    """

    packed: PackedBatch
    valid: torch.Tensor  # [m] bool: student format valid (PRISM_SPEC §3.1 v_i)
    teacher_index: torch.Tensor  # [m] long
    num_prompts: int  # k
    num_valid_global: int  # N_v over the whole step and every rank: decides between pairwise loss and fallback
    sample_index: torch.Tensor | None = None  # [m] long: each student's index in the step's samples; -1: none

    def filler(self) -> DiscriminatorBatch:
        """One sample of one-token segments, for a data-parallel rank to run at a zero loss (`Filler`)."""
        return DiscriminatorBatch(
            packed=self.packed.filler(sequences=4),  # a student's caption and CoT, its teacher's
            valid=self.valid[:1].clone(),
            teacher_index=torch.zeros(1, dtype=torch.long),
            num_prompts=1,
            num_valid_global=self.num_valid_global,
            sample_index=torch.full((1,), -1, dtype=torch.long),
        )


ScoreSink = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def discriminator_forward(
    config: DiscriminatorLossConfig, on_scores: ScoreSink | None = None
) -> Callable[[Iterator[DiscriminatorBatch], torch.nn.Module], tuple[Any, Callable]]:
    """D's alignment loss: pairwise Bradley-Terry on caption and CoT, fallback, L2 regulariser; no aux loss (§8.8).

    `on_scores(sample_index, caption, cot)` receives, per micro-batch, the students' raw eval-mode scores (the value
    head without dropout on this forward's hidden states, before the optimizer step): the scores the advantage
    needs, without a separate scoring pass (PRISM_SPEC §3.2 steps 2 and 5 share D's weights). Only on the last
    pipeline stage; entries of `sample_index` below 0 are not samples (fillers).
    """

    def forward_step(data_iterator: Iterator[DiscriminatorBatch], model: torch.nn.Module) -> tuple[Any, Callable]:
        batch = _prepare(next(data_iterator), model)
        with record_eval_scores(model) as eval_scores:
            output = _token_scores(model, batch.packed)

        def loss_func(token_scores: torch.Tensor) -> LossTriple:
            scores = _read_scores(token_scores, batch.packed)
            m, k = batch.valid.numel(), batch.num_prompts
            if on_scores is not None and eval_scores:
                clean = _read_scores(eval_scores[0], batch.packed)
                on_scores(batch.sample_index, clean[:m], clean[m : 2 * m])
            student_caption, student_cot = scores[:m], scores[m : 2 * m]
            teacher_caption = scores[2 * m : 2 * m + k][batch.teacher_index]
            teacher_cot = scores[2 * m + k : 2 * m + 2 * k][batch.teacher_index]
            result = fused_discriminator_loss(  # the Triton kernel on CUDA tensors, the reference elsewhere
                student_caption,
                student_cot,
                teacher_caption,
                teacher_cot,
                batch.valid,
                num_valid_global=batch.num_valid_global,
                config=config,
            )
            metrics = {name: _pair(value, m) for name, value in result.metrics.items()}
            return result.loss * m, _count(m, result.loss), metrics

        return output, loss_func

    return forward_step


def warmup_forward(
    aux_coef: float, top_k: int
) -> Callable[[Iterator[PackedBatch], torch.nn.Module], tuple[Any, Callable]]:
    """D's warmup loss on a micro-batch packing m teacher segments then the m paired student segments (§2.5)."""

    def forward_step(data_iterator: Iterator[PackedBatch], model: torch.nn.Module) -> tuple[Any, Callable]:
        unpadded = next(data_iterator)
        packed = _prepare(unpadded, model)
        with record_router_logits(model) as router_logits:
            output = _token_scores(model, packed)
        real_tokens = None  # the layout's padding tokens stay out of the router statistics
        if packed.num_tokens != unpadded.num_tokens:
            real_tokens = (torch.arange(packed.num_tokens, device=packed.input_ids.device) < unpadded.num_tokens)[None]

        def loss_func(token_scores: torch.Tensor) -> LossTriple:
            scores = _read_scores(token_scores, packed)
            m = scores.numel() // 2
            aux = router_load_balancing_loss(router_logits, top_k, real_tokens) if router_logits else 0.0
            result = pairwise_warmup_loss(scores[:m], scores[m:], aux_loss=aux, aux_coef=aux_coef)
            metrics = {name: _pair(value, m) for name, value in result.metrics.items()}
            return result.loss * m, _count(m, result.loss), metrics

        return output, loss_func

    return forward_step
