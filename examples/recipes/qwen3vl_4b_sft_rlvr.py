"""The baseline without stage 2: SFT -> GRPO for Qwen3-VL-4B on 8 H100s (released hyper-parameters)."""

from prism_mcore.config.recipes import qwen3vl_cluster


def recipe():
    return qwen3vl_cluster("4b", "grpo", with_prism=False)
