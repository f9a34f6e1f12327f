"""Megatron training: the shared train step, optimizer and schedules, the resumable step loop and trainables, each
data-parallel rank's micro-batches, D's rollout scores and the alignment advantage, log-probs, checkpointing,
metrics."""
