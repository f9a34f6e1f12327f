"""prism_mcore: PRISM for vision-language models on Megatron-Core."""
