"""Discriminator losses: alignment-stage pairwise loss (PRISM_SPEC §3.1, §2.4) and warmup loss (§2.5).

Alignment stage, per micro-batch of B samples, with scores first sanitised (NaN/Inf -> 0) and clipped to [-10, 10]
(zero gradient outside), `v_i` = 1 for format-valid samples, `n_v = sum v_i` on this rank and `N_v` the same count
summed over all ranks:

    L_pair = (1/max(n_v,1)) sum_i v_i [softplus(-(capT_i - capS_i)) + softplus(-(cotT_i - cotS_i))]
    L_fb   = 0.01 [softplus(-mean_i capT_i) + softplus(-mean_i cotT_i)]             (only when N_v == 0)
    L_reg  = 1/4 (mean capS^2 + mean cotS^2 + mean capT^2 + mean cotT^2)             (over all B samples)
    L_D    = 1[N_v>0] L_pair + 1[N_v=0] L_fb + 0.001 L_reg

The caller scales L_D by micro/mini batch size and all-reduces N_v; this module needs only the count.

Metrics (all detached scalars): `d_loss` = L_D, `cap_loss`/`cot_loss` = the caption/CoT halves of the active term
(pairwise, or fallback when N_v = 0), `score_reg` = L_reg, `score_reg_loss` = 0.001 L_reg, `cap_acc`/`cot_acc` =
fraction of valid samples with teacher > student (0.92 when this rank has no valid sample, as the reference logs),
`d_acc` their mean, `valid_ratio` = n_v / B, and the means of the clipped student/teacher caption/CoT scores over all
samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DISCRIMINATOR_METRICS = (
    "d_loss",
    "cap_loss",
    "cot_loss",
    "d_acc",
    "cap_acc",
    "cot_acc",
    "valid_ratio",
    "score_reg",
    "score_reg_loss",
    "student_caption_mean",
    "teacher_caption_mean",
    "student_cot_mean",
    "teacher_cot_mean",
)


@dataclass(frozen=True)
class DiscriminatorLossConfig:
    """Constants of the alignment-stage discriminator loss (released values)."""

    score_clip: float = 10.0
    score_reg_coef: float = 0.001
    fallback_coef: float = 0.01
    no_valid_accuracy: float = 0.92  # logged accuracy when a rank has no valid sample, so plots have no NaN


@dataclass
class DiscriminatorLossOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def sanitize_scores(scores: torch.Tensor, clip: float = 10.0) -> torch.Tensor:
    """Set NaN/Inf scores to 0 and clamp to [-clip, clip]; the gradient is zero for both kinds of replaced value."""
    finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    return finite.clamp(-clip, clip)


def discriminator_loss(
    student_caption: torch.Tensor,
    student_cot: torch.Tensor,
    teacher_caption: torch.Tensor,
    teacher_cot: torch.Tensor,
    valid: torch.Tensor,
    *,
    num_valid_global: int | torch.Tensor | None = None,
    config: DiscriminatorLossConfig = DiscriminatorLossConfig(),
) -> DiscriminatorLossOutput:
    """Alignment-stage discriminator loss of one micro-batch from raw [B] scores and the [B] validity mask.

    `num_valid_global` is N_v, the valid-sample count all-reduced over every rank; None means this rank is alone.
    """
    scores = [
        sanitize_scores(s.float(), config.score_clip)
        for s in (student_caption, student_cot, teacher_caption, teacher_cot)
    ]
    cap_s, cot_s, cap_t, cot_t = scores
    valid_f = valid.float()
    num_valid = valid_f.sum()
    n_global = num_valid if num_valid_global is None else torch.as_tensor(num_valid_global, dtype=torch.float32)
    has_valid_global = bool(n_global > 0)

    if has_valid_global:
        normaliser = num_valid.clamp(min=1)
        cap_loss = (valid_f * F.softplus(-(cap_t - cap_s))).sum() / normaliser
        cot_loss = (valid_f * F.softplus(-(cot_t - cot_s))).sum() / normaliser
    else:
        # No rank has a valid sample: keep the teacher scores from drifting down instead of skipping the step.
        cap_loss = config.fallback_coef * F.softplus(-cap_t.mean())
        cot_loss = config.fallback_coef * F.softplus(-cot_t.mean())
    score_reg = torch.stack([(s**2).mean() for s in scores]).mean()
    score_reg_loss = config.score_reg_coef * score_reg
    loss = cap_loss + cot_loss + score_reg_loss

    with torch.no_grad():
        if num_valid > 0:
            cap_acc = ((cap_t > cap_s).float() * valid_f).sum() / num_valid
            cot_acc = ((cot_t > cot_s).float() * valid_f).sum() / num_valid
        else:
            cap_acc = cot_acc = torch.tensor(config.no_valid_accuracy)
        values = (
            loss,
            cap_loss,
            cot_loss,
            (cap_acc + cot_acc) / 2,
            cap_acc,
            cot_acc,
            num_valid / valid_f.numel(),
            score_reg,
            score_reg_loss,
            cap_s.mean(),
            cap_t.mean(),
            cot_s.mean(),
            cot_t.mean(),
        )
        metrics = {name: value.detach().float() for name, value in zip(DISCRIMINATOR_METRICS, values, strict=True)}
    return DiscriminatorLossOutput(loss=loss, metrics=metrics)


def pairwise_warmup_loss(
    teacher_scores: torch.Tensor,
    student_scores: torch.Tensor,
    *,
    aux_loss: torch.Tensor | float = 0.0,
    aux_coef: float = 0.01,
) -> DiscriminatorLossOutput:
    """Warmup Bradley-Terry loss `mean[-log sigmoid(s_T - s_S)] + aux_coef * aux` with `acc = mean(s_T > s_S)`."""
    margin = teacher_scores.float() - student_scores.float()
    pair_loss = F.softplus(-margin).mean()
    loss = pair_loss + aux_coef * aux_loss
    metrics = {
        "loss": loss.detach(),
        "pair_loss": pair_loss.detach(),
        "acc": (margin > 0).float().mean(),
    }
    return DiscriminatorLossOutput(loss=loss, metrics=metrics)
