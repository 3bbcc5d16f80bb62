"""Training floor: the training loop and what only it needs (loss / optimizer builders, EMA, run
logging); it uses everything below it (runtime, models, data, objectives, evaluation previews)."""
