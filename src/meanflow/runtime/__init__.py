"""Runtime infrastructure (bottom floor): processes and devices, seeded randomness, crash-safe
checkpoint files. Knows nothing of models, data, objectives or training."""
