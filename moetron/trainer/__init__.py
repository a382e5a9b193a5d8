"""The training loop: build in a fixed order, step, log metrics, checkpoint."""
