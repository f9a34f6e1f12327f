"""Megatron training: the shared train step, optimizer and schedules, log-probs, checkpointing, metrics."""
