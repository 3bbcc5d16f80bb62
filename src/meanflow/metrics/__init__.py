"""Pure metrics floor (beside models, data, objectives): Frechet distances, Inception Score, precision /
recall, point-cloud distances, as functions of features or samples. Orchestration: meanflow.evaluation."""
from .digits_classifier import DigitsClassifier, digits_frechet
from .frechet import RunningStatistics, feature_statistics, frechet_distance, load_stats, save_stats
from .image_metrics import (
    FeatureExtractor,
    compute_image_metrics,
    image_statistics,
    images_to_nchw,
    inception_score,
    precision_recall,
)
from .inception import InceptionFeatures, resolve_inception_weights
from .pointcloud import class_sliced_wasserstein, energy_distance, histogram_tv, sliced_wasserstein

__all__ = [
    "DigitsClassifier",
    "FeatureExtractor",
    "InceptionFeatures",
    "RunningStatistics",
    "class_sliced_wasserstein",
    "compute_image_metrics",
    "digits_frechet",
    "energy_distance",
    "feature_statistics",
    "frechet_distance",
    "histogram_tv",
    "image_statistics",
    "images_to_nchw",
    "inception_score",
    "load_stats",
    "precision_recall",
    "resolve_inception_weights",
    "save_stats",
    "sliced_wasserstein",
]
