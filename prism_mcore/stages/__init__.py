"""The PRISM stages, each a short loop over data, rollout, rewards, algorithms and the Megatron train step:
`sft` (Stage 1), `warmup` (discriminator warmup), `align` (Stage 2, PRISM), `rlvr` (Stage 3). Each module exposes
`run(config)`."""
