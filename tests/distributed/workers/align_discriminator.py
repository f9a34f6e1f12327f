"""Worker: one alignment D step on the tiny Qwen3-VL-MoE discriminator, in a given layout, the old way and the new.

Six samples of two prompts (one sample format-invalid) in three micro-batches; with DP=2 the first rank takes the
first two micro-batches and the second rank the third, so the second rank runs a zero-loss filler. Reported:
* `reference_scores`: the old path's advantage scores, an eval-mode forward of each student segment alone before
  the update (the reference scores one sample at a time);
* `packing_score_diff`: how far an eval-mode score moves when the same segments are packed in reverse order;
* `scores`: the new path's, read off the update's own forward (`discriminator_forward(on_scores=...)`) and shared
  over the data-parallel ranks (`training.scoring.RolloutScores`);
* for both update paths (`old`: every sequence carries its images, and the filler is a copy of a real
  micro-batch; `new`: each image is encoded once per step, its later uses get the encoding and send their
  gradients back through one backward of the tower, and the filler is tiny): the step's metrics, the gradient norm,
  the updated value head and the vision tower's gradient.
"""

import argparse
from types import SimpleNamespace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--moe", required=True)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()

    import torch
    from megatron.core.utils import get_model_config

    from prism_mcore.algorithms import DiscriminatorLossConfig
    from prism_mcore.config.schema import ModelConfig, OptimConfig, ParallelConfig
    from prism_mcore.data.batching import pack_sequences, step_image_count
    from prism_mcore.data.samples import TokenSequence, mrope_position_ids
    from prism_mcore.models import build_discriminator, forward_kwargs, token_multiple
    from prism_mcore.record import ImageInputs
    from prism_mcore.runtime import init_distributed, shutdown
    from prism_mcore.training.forward import DiscriminatorBatch, discriminator_forward
    from prism_mcore.training.scoring import RolloutScores
    from prism_mcore.training.step import Filler, build_optimizer, train_step, wrap_ddp
    from tests.torchrun import write_rank_result
    from tests.unit.models.tiny_checkpoints import IMAGE, image_text_inputs

    env = init_distributed(ParallelConfig(tensor=args.tp), seed=0)
    generator = torch.Generator().manual_seed(7)

    def segment(prompt: dict, length: int) -> TokenSequence:
        ids = torch.cat([prompt["ids"], torch.randint(3, 200, (length,), generator=generator)])
        positions = mrope_position_ids(ids, prompt["images"].image_grid_thw, IMAGE, 2)
        return TokenSequence(ids, positions, image_inputs=prompt["images"], score_index=len(ids) - 1)

    prompts = []
    for seed in (1, 3):
        inputs = image_text_inputs(seed)
        images = ImageInputs(inputs["pixel_values"], inputs["image_grid_thw"])
        prompts.append({"ids": inputs["input_ids"][0], "images": images})
    samples = [
        SimpleNamespace(uid=f"p{p}", format_valid=not (p == 1 and i == 0), caption_score=None, cot_score=None)
        for p in range(2)
        for i in range(3)
    ]
    students = [(segment(prompts[p], 3 + i), segment(prompts[p], 6 + 2 * i)) for p in range(2) for i in range(3)]
    teachers = [(segment(prompts[p], 4), segment(prompts[p], 9)) for p in range(2)]
    groups = [[0, 1], [2, 3], [4, 5]]  # micro-batches: one of prompt 0, one across both prompts, one of prompt 1
    num_valid = sum(sample.format_valid for sample in samples)

    def batch(indices: list[int], share_images: bool) -> DiscriminatorBatch:
        prompt_ids = list(dict.fromkeys(index // 3 for index in indices))
        sequences = [students[i][0] for i in indices] + [students[i][1] for i in indices]
        sequences += [teachers[p][0] for p in prompt_ids] + [teachers[p][1] for p in prompt_ids]
        return DiscriminatorBatch(
            packed=pack_sequences(sequences, share_images=share_images),
            valid=torch.tensor([samples[i].format_valid for i in indices]),
            teacher_index=torch.tensor([prompt_ids.index(i // 3) for i in indices]),
            num_prompts=len(prompt_ids),
            num_valid_global=num_valid,
            sample_index=torch.tensor(indices),
        )

    mine = groups if env.dp == 1 else (groups[:2] if env.dp_rank == 0 else groups[2:])
    loss_config = DiscriminatorLossConfig()
    result = {}
    for path, share_images in (("old", False), ("new", True)):
        disc = build_discriminator(ModelConfig(), ParallelConfig(tensor=args.tp), path=args.moe, seed=0)
        models = wrap_ddp(disc.chunks, use_distributed_optimizer=False)
        optimizer, scheduler = build_optimizer(
            models, OptimConfig(lr=1e-2), total_steps=2, use_distributed_optimizer=False, bf16=False
        )
        model = disc.chunks[0]
        if path == "old":
            disc.eval()
            with torch.no_grad():
                config = get_model_config(model)
                alone = [
                    [pack_sequences([s]).padded_to_multiple(token_multiple(config), 0) for s in p] for p in students
                ]
                reference = [[model(**forward_kwargs(b))[0, b.score_indices[0], 0].item() for b in p] for p in alone]
                # The same 12 segments in one micro-batch, in order and reversed: packing must not move a score.
                every = [segment for pair in students for segment in pair]
                packings = []
                for order in (list(range(12)), list(range(12))[::-1]):
                    packed = pack_sequences([every[i] for i in order], share_images=True)
                    packed = packed.padded_to_multiple(token_multiple(config), 0)
                    scores_in_order = model(**forward_kwargs(packed))[0, packed.score_indices, 0]
                    packings.append(dict(zip(order, scores_in_order.tolist(), strict=True)))
                result["packing_score_diff"] = max(abs(packings[0][i] - packings[1][i]) for i in range(12))
            disc.train()
            result["reference_scores"] = [
                pair if sample.format_valid else [0.0, 0.0] for pair, sample in zip(reference, samples, strict=True)
            ]
        microbatches = [batch(group, share_images) for group in mine]
        if env.dp > 1 and env.dp_rank == 1 and path == "old":
            microbatches.append(Filler(microbatches[0]))  # the old filler: a full copy of a real micro-batch
        scores = RolloutScores()
        torch.manual_seed(11)  # the value head's dropout draws the same masks in both paths
        step = train_step(models, optimizer, scheduler, discriminator_forward(loss_config, scores), microbatches)
        if path == "new":
            scores.assign(env, samples, loss_config.score_clip)
            result["scores"] = [[s.caption_score, s.cot_score] for s in samples]
            result["fillers"] = step.filler_microbatches
            result["images"] = step_image_count([b.packed for b in microbatches if not isinstance(b, Filler)])
        head = model.language_model.output_layer.weight
        # The vision tower's gradient (this rank's shard): in the new path each image is encoded once per step
        # and the tower's backward runs once, with the summed gradients of every micro-batch that used it.
        vision = [p.main_grad.flatten() for _, p in sorted(model.vision_model.named_parameters())]
        result[path] = {
            "metrics": step.metrics,
            "grad_norm": step.grad_norm,
            "head": head.detach()[0].tolist(),
            "vision_grad_norm": torch.cat(vision).norm().item(),
            "vision_grad_head": torch.cat(vision)[:64].tolist(),
        }
    write_rank_result(args.out, result)
    shutdown()


if __name__ == "__main__":
    main()
