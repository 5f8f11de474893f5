"""Per-sequence log-probabilities and per-pair scores: the one scoring path of the package."""
