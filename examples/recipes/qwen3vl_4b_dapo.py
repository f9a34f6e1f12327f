"""SFT -> discriminator warmup -> PRISM alignment -> DAPO for Qwen3-VL-4B on 8 H100s (released hyper-parameters).

    NPROC=8 bash examples/run_prism.sh qwen3vl_4b_dapo model.policy_path=... model.discriminator_path=... \
        data.sft_path=... data.warmup_path=... data.align_path=... data.rl_path=... data.val_path=... \
        data.test_path=... rollout.server_urls=http://127.0.0.1:30000,...
"""

from prism_mcore.config.recipes import qwen3vl_cluster


def recipe():
    return qwen3vl_cluster("4b", "dapo")
