"""The distributed trainer: config, process group, strategies, checkpoints, logging."""
