"""medfocus.trainer: few-shot heads and baselines on cached features, their metrics and plots.

The trainer works on in-memory tensors (:class:`FeatureSet`, :class:`ClassText`) and never runs SAM2 or CLIP.
"""

from .config import TrainConfig
from .data import ClassText, FeatureMismatchError, FeatureSet, stratified_folds, validation_split
from .losses import contrastive_loss, medfocus_loss
from .methods import (
    METHODS,
    ROI_VIEW_METHODS,
    TEXT_FREE_METHODS,
    FittedModel,
    MethodUnavailableError,
    ModelMismatchError,
    fit,
    fusion_attention,
)
from .metrics import aggregate, bootstrap_accuracy_ci, compute_metrics, write_runs_csv
from .plots import plot_accuracy_vs_fraction, plot_attention_overlay, plot_confusion_matrix
from .synthetic import synthetic_task

__all__ = [
    "METHODS",
    "ROI_VIEW_METHODS",
    "TEXT_FREE_METHODS",
    "ClassText",
    "FeatureMismatchError",
    "FeatureSet",
    "FittedModel",
    "MethodUnavailableError",
    "ModelMismatchError",
    "TrainConfig",
    "aggregate",
    "bootstrap_accuracy_ci",
    "compute_metrics",
    "contrastive_loss",
    "fit",
    "fusion_attention",
    "medfocus_loss",
    "plot_accuracy_vs_fraction",
    "plot_attention_overlay",
    "plot_confusion_matrix",
    "stratified_folds",
    "synthetic_task",
    "validation_split",
    "write_runs_csv",
]
