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
from PIL import Image

from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.encoders import letterbox
from medfocus.pipeline.images import file_sha256, load_image
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.store import ImageStore, StoreMismatchError, store_key
from medfocus.trainer import FeatureSet, fusion_attention
from medfocus.trainer.plots import plot_attention_overlay

from .common import load_prepared
from .features import (
    MODES_WITHOUT_MASKS,
    encode_steered,
    encoder_options,
    feature_store_spec,
    mode_params,
    resolve_encoder,
    steer,
)
from .segment import mask_store_spec, resolved_segmenter_options, segmenter_options, shared_segmenter
from .train import current_feature_store, load_trained, model_path


def _differences(made: dict, stored: dict) -> list[str]:
    """Dotted names of the settings (one level into each section) where two store specs differ."""
    names = []
    for key in sorted(set(made) | set(stored)):
        mine, theirs = made.get(key), stored.get(key)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            names += [f"{key}.{k}" for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        elif mine != theirs:
            names.append(key)
    return names


def check_features_match(made_spec: dict, store: ImageStore) -> None:
    """Refuse to make features for a head unless they are made as the features of its store were (same spec)."""
    if store_key(made_spec) != store.key:
        stored = store.attrs["spec"]
        made = json.loads(json.dumps(made_spec))
        raise StoreMismatchError(
            f"the encoder or segmenter built here differs from the one that made {store.url}, whose features the head "
            f"was trained on (differing: {', '.join(_differences(made, stored))}); rerun `medfocus features` and "
            "`medfocus train` with today's settings"
        )


def predict(spec: DatasetSpec, params: Params, paths: DatasetPaths, images: list[Path], model_file: Path | None = None) -> list[dict]:
    missing = [str(path) for path in images if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {', '.join(missing)}")
    settings = params.train
    prepared = load_prepared(spec, params, paths, progress=False)
    shots = settings.shots
    fraction = None if shots is not None else settings.fraction
    model_file = model_file or model_path(paths, settings.method, settings.mode, fraction, shots, settings.seed)
    mode = settings.mode
    # The head must come from the features today's settings make, or its numbers would mean nothing here.
    store = current_feature_store(spec, params, paths, mode)
    model = load_trained(model_file, store, prepared.class_names)
    encoder, _ = resolve_encoder(encoder_options(params.features))
    segmenter, mask_key = None, None
    if mode not in MODES_WITHOUT_MASKS:
        segmenter = shared_segmenter(resolved_segmenter_options(segmenter_options(params.segment, spec.name)))
        mask_key = store_key(mask_store_spec(segmenter.describe()))
    steering = mode_params(params.features, mode)
    check_features_match(feature_store_spec(encoder.describe(), mode, steering, mask_key, params.features.dtype), store)
    stored_dtype = np.dtype(params.features.dtype)
    out_dir = paths.predictions_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for image_path in images:
        image = load_image(image_path)
        digest = file_sha256(image_path)
        roi = labels = None
        if segmenter is not None:
            segmentation = segmenter.segment(image)
            roi, labels = segmentation.roi.astype(bool), segmentation.labels.astype(np.uint16)
        steered, weights = steer(image, roi, labels, mode, steering, encoder.grid)
        global_embedding, patches = encode_steered(encoder, encoder.preprocess(steered)[None], weights[None], mode, steering)
        # Through the stored precision, as the head's training features went.
        features = FeatureSet(torch.from_numpy(global_embedding.astype(stored_dtype).astype(np.float32)),
                              torch.from_numpy(patches.astype(stored_dtype).astype(np.float32)),
                              torch.from_numpy(weights)[None], torch.zeros(1, dtype=torch.long), [digest])
        probabilities = model.predict_proba(features)[0]
        predicted = int(probabilities.argmax())
        # Images of the same name from different folders get their own overlay.
        overlay = out_dir / f"{Path(image_path).stem}-{digest[:8]}.png"
        view = letterbox(steered, encoder.image_size, Image.Resampling.BILINEAR)
        if model.method == "medfocus":
            attention = fusion_attention(model, features)[0, predicted]
            heading = "fusion attention"
        else:
            attention, heading = torch.from_numpy(weights), "(no attention: not a medfocus head)"
        plot_attention_overlay(view, weights, attention, overlay,
                               f"{Path(image_path).name}: {prepared.class_names[predicted]} ({100 * float(probabilities[predicted]):.1f}%) — "
                               f"{model.method}/{mode}, {heading}, encoder {model.meta.get('weights_source')}", grid=encoder.grid)
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
