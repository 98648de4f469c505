"""Training one or several models: the loop (engine), optimisers, precision, pruning, freezing, resume, checkpoints."""
