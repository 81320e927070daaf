"""Training: the train step, optimiser, losses, the loop, checkpoints (all of their layout and
restore), the workdir record, checkpoint selection on a validation split and the feature cache."""
