"""``sed-fast train``: the official training recipe (augmentation, AdamW, cosine schedule, gradient
clipping), many processes with torchrun, checkpoints in the official format, resumable."""
