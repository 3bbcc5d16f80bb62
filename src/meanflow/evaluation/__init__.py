"""Evaluation floor: score a trained run (sampling + metrics against its reference data) and draw
preview images; above sampling and the pure metrics, below training and the CLI."""
from .images import evaluate_images
from .preview import save_preview
from .run import evaluate_points, evaluate_run, sampler_plan

__all__ = ["evaluate_images", "evaluate_points", "evaluate_run", "sampler_plan", "save_preview"]
