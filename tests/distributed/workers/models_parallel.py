"""Worker: check the Qwen3-VL models in one parallel layout against transformers and report every number.

`--model dense` (TP/PP): logits of image+text and text-only inputs, a packed 3-sequence batch, log-probs and entropy
at temperature 0.7, their gradients (final norm, vision patch embedding) against transformers' autograd, the HF
export stream against the source checkpoint; then the weights are perturbed, saved as a dist checkpoint and as an HF
folder that transformers reloads.
`--model moe` (EP): MoE logits and router logits (+ the reference aux loss) with a different input on each rank, so
tokens are dispatched to experts on the other rank; the discriminator's scores against transformers' hidden states
times the head; the export stream; a perturbed discriminator saved as a dist checkpoint.
`--model moe --tp 2`: TP turns on sequence parallelism for the MoE models (as the bridge does); packed batches of an
even and of an odd token count (padded to the TP size) against transformers: logits, the aux loss from the gathered
router logits (padding masked out), discriminator scores, and gradients of a scalar of the scores; then a perturbed
discriminator saved as a dist checkpoint.
`--reload DENSE_CKPT,DISC_CKPT[,DISC_CKPT...]` (one process): loads those checkpoints into TP=PP=EP=1 models and
reports the policy's logits and each discriminator's scores.

Heavy imports live in `main()`: dist-checkpointing spawns a helper process that re-imports this file.
"""

import argparse
from pathlib import Path

TEMPERATURE = 0.7


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", choices=["dense", "moe"], default="dense")
    parser.add_argument("--dense", required=True)
    parser.add_argument("--moe", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--save", default=None, help="folder for the perturbed model's checkpoints")
    parser.add_argument("--reload", default=None, help="dense and moe dist checkpoints to load, comma-separated")
    args = parser.parse_args()

    from prism_mcore.config.schema import ModelConfig, ParallelConfig
    from prism_mcore.runtime import init_distributed, shutdown
    from tests.torchrun import write_rank_result

    parallel = ParallelConfig(tensor=args.tp, pipeline=args.pp, expert=args.ep)
    init_distributed(parallel, seed=0)
    model_cfg = ModelConfig()
    if args.reload:
        result = reload(args, model_cfg, parallel)
    elif args.model == "dense":
        result = check_dense(args, model_cfg, parallel)
    elif args.tp > 1:
        result = check_moe_sequence_parallel(args, model_cfg, parallel)
    else:
        result = check_moe(args, model_cfg, parallel)
    write_rank_result(args.out, result)
    shutdown()


def run(chunks, inputs: dict, *, backward: bool = False):
    """One micro-batch through Megatron's schedule (pipelined when PP > 1); the last stage's output, else None.

    With `backward`, the output must be `(logprobs, entropy)` and the loss is sum(logprobs) + 0.1 * sum(entropy).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(output):
        logprobs, entropy = output
        loss = logprobs.sum() + 0.1 * entropy.sum()
        return loss, {"output": output}

    def forward_step(data_iterator, model):
        output = model(**next(data_iterator))
        return output, (loss_func if backward else None)

    tokens = inputs["input_ids"].shape[1]
    store = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([inputs]), model=chunks, num_microbatches=1,
        seq_length=tokens, micro_batch_size=1, forward_only=not backward,
    )  # fmt: skip
    if not parallel_state.is_pipeline_last_stage():
        return None
    return store[0]["output"] if backward else store[0]


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def perturb(chunks) -> None:
    """A deterministic, layout-independent change of every weight (a reloaded checkpoint must not match the source)."""
    import torch

    with torch.no_grad():
        for chunk in chunks:
            for param in chunk.parameters():
                param.mul_(1.01).add_(0.001)


def check_dense(args, model_cfg, parallel) -> dict:
    import torch
    from megatron.core import parallel_state
    from safetensors.torch import load_file
    from transformers import Qwen3VLForConditionalGeneration

    from prism_mcore.data.batching import pack_token_ids
    from prism_mcore.models import build_policy, forward_kwargs, iter_hf_weights, save_hf
    from prism_mcore.record import ImageInputs
    from prism_mcore.training.logprobs import LogProbRequest, logprobs_output_processor
    from tests.checkpoint_support import save_model_weights
    from tests.unit.models.tiny_checkpoints import hf_forward, image_text_inputs, text_inputs

    policy = build_policy(model_cfg, parallel, path=args.dense)
    hf = Qwen3VLForConditionalGeneration.from_pretrained(
        args.dense, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    image_text, text = image_text_inputs(), text_inputs()
    last_stage = parallel_state.is_pipeline_last_stage()
    result = {}

    policy.eval()
    with torch.no_grad():
        for name, inputs in (("image_text", image_text), ("text", text)):
            logits = run(policy.chunks, {**inputs, "runtime_gather_output": True})
            if last_stage:
                result[f"logits_{name}"] = max_diff(logits, hf_forward(hf, inputs).logits)
        short = {"input_ids": text["input_ids"][:, :5]}
        batch = pack_token_ids(
            [text["input_ids"][0], image_text["input_ids"][0], short["input_ids"][0]],
            [None, ImageInputs(image_text["pixel_values"], image_text["image_grid_thw"]), None],
        )
        packed = run(policy.chunks, {**forward_kwargs(batch), "runtime_gather_output": True})
        if last_stage:
            reference = torch.cat([hf_forward(hf, x).logits[0] for x in (text, image_text, short)])
            result["logits_packed"] = max_diff(packed[0], reference)

    # Log-probs, entropy and their gradients (train mode: Megatron's and transformers' dropouts are all 0).
    policy.train()
    targets, valid = batch.next_token_targets()
    request = LogProbRequest(targets, temperature=TEMPERATURE)
    output = run(
        policy.chunks,
        {**forward_kwargs(batch), "output_processor": logprobs_output_processor, "output_processor_context": request},
        backward=True,
    )
    hf_logprobs, hf_entropy = [], []
    for x in (text, image_text, short):
        log_p = torch.log_softmax(hf_forward(hf, x, grad=True).logits[0] / TEMPERATURE, dim=-1)
        hf_logprobs.append(log_p)
        hf_entropy.append(-(log_p.exp() * log_p).sum(-1))
    log_p = torch.cat(hf_logprobs)
    hf_lp = log_p.gather(-1, targets[0, :, None]).squeeze(-1)
    (hf_lp.sum() + 0.1 * torch.cat(hf_entropy).sum()).backward()
    if last_stage:
        logprobs, entropy = output
        result["logprobs"] = max_diff(logprobs[valid], hf_lp[valid[0]])
        result["entropy"] = max_diff(entropy[0], torch.cat(hf_entropy))
        norm = policy.chunks[0].language_model.decoder.final_layernorm.weight.grad
        result["grad_final_norm"] = max_diff(norm, hf.model.language_model.norm.weight.grad)
        result["grad_final_norm_scale"] = hf.model.language_model.norm.weight.grad.abs().max().item()
    if parallel_state.is_pipeline_first_stage():
        patch = policy.chunks[0].vision_model.patch_embed.proj.weight.grad
        result["grad_patch_embed"] = max_diff(patch, hf.model.visual.patch_embed.proj.weight.grad)
        result["grad_patch_embed_scale"] = hf.model.visual.patch_embed.proj.weight.grad.abs().max().item()

    source = load_file(Path(args.dense) / "model.safetensors")
    exported = dict(iter_hf_weights(policy))
    result["export_names_equal"] = sorted(exported) == sorted(source)
    result["export_mismatches"] = sorted(n for n in source if n in exported and not torch.equal(exported[n], source[n]))

    perturb(policy.chunks)
    policy.eval()
    with torch.no_grad():
        perturbed = run(policy.chunks, {**image_text, "runtime_gather_output": True})
    save_model_weights(policy, Path(args.save) / "dense_ckpt")
    save_hf(policy, Path(args.save) / "dense_hf")
    if last_stage:
        result["perturbed_logits"] = perturbed[0].tolist()
    if torch.distributed.get_rank() == 0:
        reloaded = Qwen3VLForConditionalGeneration.from_pretrained(
            Path(args.save) / "dense_hf", dtype=torch.float32
        ).eval()
        result["save_hf_logits"] = hf_forward(reloaded, image_text).logits[0].tolist()
    return result


def check_moe(args, model_cfg, parallel) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen3VLMoeForConditionalGeneration

    from prism_mcore.models import (
        build_discriminator,
        build_policy,
        iter_hf_weights,
        record_router_logits,
        router_load_balancing_loss,
    )
    from tests.checkpoint_support import save_model_weights
    from tests.unit.models.tiny_checkpoints import hf_forward, image_text_inputs, text_inputs

    rank = torch.distributed.get_rank()
    # Different tokens on the two ranks, same length (the allgather dispatcher exchanges equal-sized blocks).
    inputs = image_text_inputs() if rank == 0 else text_inputs(length=image_text_inputs()["input_ids"].shape[1])
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(
        args.moe, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    reference = hf_forward(hf, inputs, output_router_logits=True)
    result = {}

    policy = build_policy(model_cfg, parallel, path=args.moe).eval()
    with torch.no_grad(), record_router_logits(policy.chunks) as router_logits:
        logits = policy.chunks[0](**inputs)
    result["logits"] = max_diff(logits, reference.logits)
    result["router_logits"] = max(
        max_diff(ours.reshape(ref.shape), ref) for ours, ref in zip(router_logits, reference.router_logits, strict=True)
    )
    result["aux_loss"] = router_load_balancing_loss(router_logits, top_k=2).item()
    result["hf_aux_loss"] = reference.aux_loss.item()
    source = load_file(Path(args.moe) / "model.safetensors")
    exported = dict(iter_hf_weights(policy))
    result["export_names_equal"] = sorted(exported) == sorted(source)
    result["export_mismatches"] = sorted(n for n in source if n in exported and not torch.equal(exported[n], source[n]))
    del policy

    disc = build_discriminator(model_cfg, parallel, path=args.moe).eval()
    head = disc.chunks[0].language_model.output_layer.weight
    with torch.no_grad():
        scores = disc.chunks[0](**inputs)
        hidden = hf_forward(hf.model, inputs).last_hidden_state
        result["scores"] = max_diff(scores, hidden @ head.T)
        perturb(disc.chunks)
        check = image_text_inputs()
        result["perturbed_scores"] = disc.chunks[0](**check)[0, :, 0].tolist()
    save_model_weights(disc, Path(args.save) / "disc_ckpt")
    return result


def check_moe_sequence_parallel(args, model_cfg, parallel) -> dict:
    import torch
    from megatron.core.utils import get_model_config
    from transformers import Qwen3VLMoeForConditionalGeneration

    from prism_mcore.algorithms.moe_aux import load_balancing_loss
    from prism_mcore.data.batching import pack_token_ids
    from prism_mcore.models import (
        build_discriminator,
        build_policy,
        forward_kwargs,
        padding_token_id,
        record_router_logits,
        router_load_balancing_loss,
        token_multiple,
    )
    from prism_mcore.record import ImageInputs
    from tests.checkpoint_support import save_model_weights
    from tests.unit.models.tiny_checkpoints import hf_forward, image_text_inputs, text_inputs

    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(
        args.moe, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    image_text = image_text_inputs()  # 23 tokens
    images = ImageInputs(image_text["pixel_values"], image_text["image_grid_thw"])
    result = {}
    policy = build_policy(model_cfg, parallel, path=args.moe).eval()
    config = get_model_config(policy.chunks[0])
    result["sequence_parallel"] = config.sequence_parallel
    for name, text_length in (("even", 13), ("odd", 12)):
        text = text_inputs(length=text_length)
        batch = pack_token_ids([image_text["input_ids"][0], text["input_ids"][0]], [images, None])
        padded = batch.padded_to_multiple(token_multiple(config), padding_token_id(config))
        real = torch.arange(padded.num_tokens) < batch.num_tokens
        references = [hf_forward(hf, x, output_router_logits=True) for x in (image_text, text)]
        with torch.no_grad(), record_router_logits(policy.chunks) as router_logits:
            logits = policy.chunks[0](**forward_kwargs(padded), runtime_gather_output=True)
        result[f"padded_tokens_{name}"] = padded.num_tokens
        result[f"logits_{name}"] = max_diff(logits[0, : batch.num_tokens], torch.cat([r.logits[0] for r in references]))
        ours = router_load_balancing_loss(router_logits, top_k=2, token_mask=real[None]).item()
        per_layer = [torch.cat(layer) for layer in zip(*(r.router_logits for r in references), strict=True)]
        result[f"aux_loss_{name}"] = abs(ours - load_balancing_loss(per_layer, top_k=2).item())
    del policy

    disc = build_discriminator(model_cfg, parallel, path=args.moe)
    disc.chunks[0].eval()  # no dropout in the head: scores are deterministic
    head = disc.chunks[0].language_model.output_layer.weight
    scores = disc.chunks[0](**forward_kwargs(padded))[0, : batch.num_tokens, 0]
    with torch.no_grad():
        hidden = torch.cat([hf_forward(hf.model, x).last_hidden_state[0] for x in (image_text, text)])
    result["scores"] = max_diff(scores, (hidden @ head.T)[:, 0])
    # A scalar of the real tokens' scores: the head's gradient is the sum of the scored hidden states, so it checks
    # the sequence-parallel gather's backward (a split, not a reduction).
    (scores * torch.linspace(-1, 1, scores.numel())).sum().backward()
    expected = (hidden * torch.linspace(-1, 1, scores.numel())[:, None]).sum(0)
    result["head_grad"] = max_diff(head.grad[0], expected)

    # The perturbed D's scores of image+text alone (padded to the TP size), then its checkpoint, which holds the
    # sequence-parallel norms and the value head: the reload run scores the same tokens at TP=1.
    perturb(disc.chunks)
    alone = pack_token_ids([image_text["input_ids"][0]], [images])
    padded = alone.padded_to_multiple(token_multiple(config), padding_token_id(config))
    with torch.no_grad():
        scores = disc.chunks[0](**forward_kwargs(padded))
    result["perturbed_scores"] = scores[0, : alone.num_tokens, 0].tolist()
    save_model_weights(disc, Path(args.save) / "disc_ckpt")
    return result


def reload(args, model_cfg, parallel) -> dict:
    import torch

    from prism_mcore.models import build_discriminator, build_policy
    from tests.checkpoint_support import load_model_weights
    from tests.unit.models.tiny_checkpoints import image_text_inputs

    dense_ckpt, *disc_ckpts = args.reload.split(",")
    inputs = image_text_inputs()
    policy = build_policy(model_cfg, parallel, path=args.dense).eval()
    load_model_weights(policy, dense_ckpt)
    result = {"scores": []}
    with torch.no_grad():
        result["logits"] = policy.chunks[0](**inputs)[0].tolist()
    for disc_ckpt in disc_ckpts:
        # A fresh model per checkpoint: the EP=2 and TP=2 ones hold the same weights, so a load that left the
        # previous checkpoint's weights in place would go unnoticed.
        disc = build_discriminator(model_cfg, parallel, path=args.moe).eval()
        load_model_weights(disc, disc_ckpt)
        with torch.no_grad():
            result["scores"].append(disc.chunks[0](**inputs)[0, :, 0].tolist())
    return result


if __name__ == "__main__":
    main()
