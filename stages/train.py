"""The train stage: a trainer head fitted on the cached features of one training subset, saved with its provenance
under a key of everything that determines it (pipeline.trained_heads).

The trainer reads tensors from the feature stores only; it never runs a segmenter or an encoder.
"""

from __future__ import annotations

from medfocus.pipeline.cached_features import load_cached_features, subset_hashes
from medfocus.pipeline.config import Params
from medfocus.pipeline.current_stores import current_feature_store
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.preparation import load_prepared
from medfocus.pipeline.trained_heads import HeadRequest, save_head
from medfocus.trainer import compute_metrics, fit


def train(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> dict:
    """Fit ``params.train`` on its subset, save the head, report its test metrics."""
    settings = params.train
    request = HeadRequest.from_settings(settings)
    prepared = load_prepared(spec, params, paths, progress=False)
    prepared.require_two_classes()
    cached = load_cached_features(prepared, current_feature_store(spec, params, paths, settings.mode))
    train_rows = cached.rows(subset_hashes(paths, request.fraction, request.shots, settings.seed))
    model = fit(settings.method, cached.features.subset(train_rows), cached.text, settings.trainer_config(), settings.seed)
    path = save_head(model, paths, request, cached, settings, prepared)
    test = cached.features.subset(cached.splits["test"])
    metrics = compute_metrics(test.labels, model.predict_proba(test), prepared.class_names) if len(test) else {}
    return {"model": str(path), "method": settings.method, "mode": settings.mode, "fraction": request.fraction,
            "shots": request.shots, "seed": settings.seed, "n_train": len(train_rows),
            "weights_source": cached.weights_source, "fit_seconds": round(model.fit_info["fit_seconds"], 3),
            "test": {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1") if k in metrics}}
