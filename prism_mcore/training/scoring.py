"""D's scores of the rollouts and the alignment advantage computed from them (PRISM_SPEC §3.1, §3.2).

The scores come out of D's update forward on each rank's share (`RolloutScores`, the forward's `on_scores`) and are
gathered from the last pipeline stage and the data-parallel ranks onto every rank; the advantage runs the fused
Triton kernel on a GPU and its torch reference on CPU.
"""

from __future__ import annotations

import torch
from prism_kernels.alignment_advantage import fused_alignment_advantage

from prism_mcore.algorithms import AlignmentAdvantageConfig, group_ids_from_uids, sanitize_scores
from prism_mcore.record import Sample
from prism_mcore.runtime import DistEnv, broadcast_from_last_stage, gather_data_parallel


class RolloutScores:
    """The students' eval-mode caption and CoT scores, collected from D's update forward (`discriminator_forward`'s
    `on_scores`) on each rank's share, then shared with every rank."""

    def __init__(self) -> None:
        self.mine: dict[int, tuple[float, float]] = {}

    def __call__(self, sample_index: torch.Tensor, caption: torch.Tensor, cot: torch.Tensor) -> None:
        for index, caption_score, cot_score in zip(sample_index.tolist(), caption.tolist(), cot.tolist(), strict=True):
            if index >= 0:
                self.mine[index] = (caption_score, cot_score)

    def assign(self, env: DistEnv, samples: list[Sample], score_clip: float) -> None:
        """Fill `caption_score`/`cot_score` with D's clipped scores; 0 for invalid formats (PRISM_SPEC §2.4, §1)."""
        scores = torch.zeros(len(samples), 2)
        mine = broadcast_from_last_stage(self.mine)
        for share in gather_data_parallel(mine) if env.dp > 1 else [mine]:
            for index, pair in share.items():
                scores[index] = torch.tensor(pair)
        scores = sanitize_scores(scores, clip=score_clip)
        for sample, (caption, cot) in zip(samples, scores.tolist(), strict=True):
            sample.caption_score, sample.cot_score = (caption, cot) if sample.format_valid else (0.0, 0.0)


def alignment_advantages(samples: list[Sample], config: AlignmentAdvantageConfig, env: DistEnv) -> torch.Tensor:
    """Each sample's alignment advantage from its pre-update D scores, format validity, accuracy and format reward,
    normalised within its prompt's group (computed on `env.device`: the Triton kernel on a GPU)."""
    device = env.device
    return fused_alignment_advantage(
        torch.tensor([s.caption_score for s in samples], device=device),
        torch.tensor([s.cot_score for s in samples], device=device),
        torch.tensor([s.format_valid for s in samples], device=device),
        group_ids_from_uids([s.uid for s in samples]).to(device),
        accuracy=torch.tensor([s.accuracy for s in samples], device=device),
        format_reward=torch.tensor([s.format_reward for s in samples], device=device),
        config=config,
    ).cpu()
