"""Model building: Qwen3-VL policy and Qwen3-VL-MoE discriminator on Megatron-Core (via Megatron-Bridge), HF import/export, upcycling."""
