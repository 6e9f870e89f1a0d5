"""Recovery training: the fine-tuning loop and its checkpoints."""
