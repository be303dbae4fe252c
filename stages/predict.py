"""Predict new images with a trained head: segment and encode each image with the dataset's settings, then classify.

For each image: the class, the probabilities, and an overlay PNG of its ROI and the fusion attention (medfocus heads).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.encoders import attention_bias, create_encoder, letterbox
from medfocus.pipeline.images import file_sha256, load_image
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.segmenters import create_segmenter
from medfocus.trainer import FeatureSet, FittedModel, fusion_attention
from medfocus.trainer.plots import plot_attention_overlay

from .common import load_prepared
from .features import MODES_WITHOUT_MASKS, encoder_options, mode_params, steer
from .segment import segmenter_options
from .train import current_feature_store, model_path


def predict(spec: DatasetSpec, params: Params, paths: DatasetPaths, images: list[Path], model_file: Path | None = None) -> list[dict]:
    settings = params.train
    prepared = load_prepared(spec, params, paths, progress=False)
    shots = settings.shots
    fraction = None if shots is not None else settings.fraction
    model_file = model_file or model_path(paths, settings.method, settings.mode, fraction, shots, settings.seed)
    mode = settings.mode
    # The head must come from the features today's settings make, or its numbers would mean nothing here.
    store = current_feature_store(spec, params, paths, mode)
    model = FittedModel.load(model_file, expect={"feature_store_key": store.key, "mode": mode, "class_names": prepared.class_names})
    encoder = create_encoder(**encoder_options(params.features))
    segmenter = None if mode in MODES_WITHOUT_MASKS else create_segmenter(**segmenter_options(params.segment, spec.name))
    steering = mode_params(params.features, mode)
    out_dir = paths.predictions_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for image_path in images:
        image = load_image(image_path)
        roi = labels = None
        if segmenter is not None:
            segmentation = segmenter.segment(image)
            roi, labels = segmentation.roi, segmentation.labels
        steered, weights = steer(image, roi, labels, mode, steering, encoder.grid)
        bias = attention_bias(torch.from_numpy(weights)[None], steering["strength"]) if mode == "attention" else None
        with torch.inference_mode():
            global_embedding, patches = encoder.encode_images(encoder.preprocess(steered)[None], patch_bias=bias)
        features = FeatureSet(global_embedding.float(), patches.float(), torch.from_numpy(weights)[None], torch.zeros(1, dtype=torch.long),
                              [file_sha256(image_path)])
        probabilities = model.predict_proba(features)[0]
        predicted = int(probabilities.argmax())
        overlay = out_dir / f"{Path(image_path).stem}.png"
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
            "probabilities": {name: round(float(p), 4) for name, p in zip(prepared.class_names, probabilities)},
            "roi_fraction": float(np.mean(roi)) if roi is not None else None,
            "overlay": str(overlay),
            "model": str(model_file),
            "weights_source": model.meta.get("weights_source"),
        })
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
