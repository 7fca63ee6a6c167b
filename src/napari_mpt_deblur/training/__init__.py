"""Training and fine-tuning: configuration, patch sampling, the training loop."""
