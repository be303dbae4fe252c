"""medfocus.trainer: few-shot heads and baselines on cached features, their metrics and plots.

The trainer works on in-memory tensors (:class:`FeatureSet`, :class:`ClassText`) and never runs SAM2 or CLIP.
Names load on first use (PEP 562): importing the package, or only its settings (``medfocus.trainer.config``, which
params.yaml validation needs), does not import torch or matplotlib, so commands that train nothing start fast.
"""

from importlib import import_module

_MODULE_OF = {
    "ClassText": "data",
    "FeatureMismatchError": "data",
    "FeatureSet": "data",
    "FittedModel": "methods",
    "METHODS": "config",
    "MethodUnavailableError": "methods",
    "ModelMismatchError": "methods",
    "ROI_VIEW_METHODS": "config",
    "TEXT_FREE_METHODS": "config",
    "TrainConfig": "config",
    "aggregate": "metrics",
    "bootstrap_accuracy_ci": "metrics",
    "compute_metrics": "metrics",
    "contrastive_loss": "losses",
    "fit": "methods",
    "fusion_attention": "methods",
    "medfocus_loss": "losses",
    "plot_accuracy_vs_fraction": "plots",
    "plot_attention_overlay": "plots",
    "plot_confusion_matrix": "plots",
    "stratified_folds": "data",
    "synthetic_task": "synthetic",
    "validation_split": "data",
    "write_runs_csv": "metrics",
}

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


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
