"""Training: `train(config)`."""
