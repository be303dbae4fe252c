"""Predict new images with a trained head: segment and encode each image with the dataset's settings, then classify.

For each image: the class, the probabilities, and an overlay PNG of its ROI and the fusion attention (medfocus heads).
The features of a new image are made exactly as the head's training features were (same encoder, segmenter, steering
and stored precision); a head whose feature store differs from what today's settings make is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from medfocus.pipeline.config import Params
from medfocus.pipeline.current_stores import current_feature_store, resolve_features_for
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.encoders import ImageEncoder
from medfocus.pipeline.feature_bank import join_rows
from medfocus.pipeline.featurize import encoder_view, image_features, shared_encoder
from medfocus.pipeline.images import file_sha256, load_image
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.preparation import load_prepared
from medfocus.pipeline.trained_heads import HeadRequest, load_head
from medfocus.pipeline.worker_models import shared_segmenter
from medfocus.trainer import FeatureSet, fusion_attention
from medfocus.trainer.plots import plot_attention_overlay


def predict(spec: DatasetSpec, params: Params, paths: DatasetPaths, images: list[Path], model_file: Path | None = None) -> list[dict]:
    missing = [str(path) for path in images if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {', '.join(missing)}")
    settings = params.train
    prepared = load_prepared(spec, params, paths, progress=False)
    mode = settings.mode
    # The head must come from the store today's settings make (load_head refuses another store's or settings' head),
    # and the features below are made by the same spec: same encoder and weights, segmenter, steering and precision.
    store = current_feature_store(spec, params, paths, mode, prepared)
    model, model_file = load_head(paths, HeadRequest.from_settings(settings), store, settings, prepared, model_file)
    features_spec = resolve_features_for(spec, params, prepared, [mode], paths)
    # One encoder, or each encoder of a bank (the first gives the tokens and the picture), with its store's spec.
    encoders: list[tuple[ImageEncoder, object]] = [(shared_encoder(member.encoder.build), member.stores[mode])
                                                   for member in features_spec.encoders]
    encoder = encoders[0][0]
    needs_masks = any(store_spec.mask_store_key for _, store_spec in encoders)
    segmenter = shared_segmenter(features_spec.segment.build_options) if needs_masks else None
    stored_dtype = np.dtype(params.features.dtype)
    out_dir = paths.predictions_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for image_path in images:
        image = load_image(image_path)
        digest = file_sha256(image_path)
        segmentation = segmenter.segment(image) if segmenter is not None else None
        rows = [image_features(member, image, segmentation, mode, store_spec) for member, store_spec in encoders]
        seen = rows[0][1]
        # Through the stored precision (then a bank's join), as the head's training features went.
        stored_rows = [{name: np.asarray(array).astype(stored_dtype if name != "roi_weights" else np.float32).astype(np.float32)
                        for name, array in row.items()} for row, _ in rows]
        arrays = join_rows(stored_rows) if len(stored_rows) > 1 else stored_rows[0]
        stored = {name: torch.from_numpy(np.asarray(array, dtype=np.float32))[None] for name, array in arrays.items()}
        features = FeatureSet(stored["global"], stored["patches"], stored["roi_weights"], torch.zeros(1, dtype=torch.long),
                              [digest], roi_global=stored.get("roi_global"))
        probabilities = model.predict_proba(features)[0]
        predicted = int(probabilities.argmax())
        weights = stored["roi_weights"][0]
        # Images of the same name from different folders get their own overlay.
        overlay = out_dir / f"{Path(image_path).stem}-{digest[:8]}.png"
        if model.method == "medfocus":
            attention = fusion_attention(model, features)[0, predicted]
            heading = "fusion attention"
        else:
            attention, heading = weights, f"(ROI weights: {model.method} has no patch attention)"
        plot_attention_overlay(encoder_view(encoder, seen), weights.numpy(), attention, overlay,
                               f"{Path(image_path).name}: {prepared.class_names[predicted]} ({100 * float(probabilities[predicted]):.1f}%) — "
                               f"{model.method}/{mode}, {heading}, encoder {model.meta.get('weights_source')}", grid=encoder.grid)
        roi = segmentation.roi if segmentation is not None else None
        results.append({
            "image": str(image_path),
            "class": prepared.class_names[predicted],
            "probabilities": {name: float(p) for name, p in zip(prepared.class_names, probabilities)},
            "roi_fraction": float(np.mean(roi)) if roi is not None else None,
            "overlay": str(overlay),
            "model": str(model_file),
            "weights_source": model.meta.get("weights_source"),
        })
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
