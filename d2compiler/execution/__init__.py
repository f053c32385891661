"""Running passes over blocks: the block executor, placement, checkpoints, processes, streaming, evaluation forwards."""
