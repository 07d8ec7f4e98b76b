"""Training: optimiser, sharded train state and steps, checkpoints, metrics, the train loop."""
