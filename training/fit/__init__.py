"""Fitting a network: the training loop, the fine-tuning objectives, mixing, checkpoints, DDP."""
