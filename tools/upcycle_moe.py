"""Upcycle a dense Qwen3-VL HF checkpoint into a Qwen3-VL-MoE discriminator backbone (PRISM_SPEC §2.1).

    python tools/upcycle_moe.py DENSE_DIR OUT_DIR [--num-experts 4] [--top-k 2] [--noise-std 0.01] [--seed 42]

PRISM upcycles Qwen3-VL-2B-Instruct (loaded in bf16) to 4 experts, top-2; the defaults reproduce that.
"""

import argparse

import torch

from prism_mcore.models.upcycle import upcycle_to_moe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--noise-std", type=float, default=0.01)
    parser.add_argument("--router-std", type=float, default=0.02)
    parser.add_argument("--aux-loss-coef", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    out = upcycle_to_moe(
        args.dense_dir,
        args.out_dir,
        num_experts=args.num_experts,
        top_k=args.top_k,
        noise_std=args.noise_std,
        router_std=args.router_std,
        aux_loss_coef=args.aux_loss_coef,
        seed=args.seed,
        dtype=dtype,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
