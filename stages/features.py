"""The features stage: images (+ their ROI from the mask store) through a frozen encoder once, into Zarr.

One store per ROI steering mode, at ``cache/<dataset>/features/<key>.zarr``; the key hashes the encoder's identity
(model, weights source and checksum, image size), the mode and its parameters, the mask store's key (for modes that
use masks) and the stored dtype. Per image: ``global`` (D), ``patches`` (L × D), ``roi_weights`` (L). Once per store:
the text embedding of every class prompt (``shared/text``), when the encoder has a text tower.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from medfocus.pipeline.config import FeaturesParams, Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.encoders import (
    attention_bias,
    create_encoder,
    crop_box,
    resize_mask_nearest,
    roi_patch_weights,
    steer_image,
    steering_params,
)
from medfocus.pipeline.encoders.steering import canonical_layers
from medfocus.pipeline.images import load_image
from medfocus.pipeline.manifest import write_json
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.provenance import RANDOM_INIT, is_random_init, package_versions
from medfocus.pipeline.runner import Outcome, WorkItem, run_incremental
from medfocus.pipeline.store import ImageStore, store_key

from .common import PreparedDataset, load_prepared, per_thread_model, set_torch_threads
from .segment import current_mask_store

log = logging.getLogger(__name__)

FEATURE_STORE_FORMAT = 1
MODES_WITHOUT_MASKS = ("none",)


def encoder_options(settings: FeaturesParams) -> dict:
    return {
        "model": settings.model,
        "pretrained": settings.pretrained,
        "allow_random_init": settings.allow_random_init,
        "device": settings.device,
        "attention_layers": canonical_layers(settings.attention_layers),
    }


def mode_params(settings: FeaturesParams, mode: str) -> dict:
    """The canonical parameters of ``mode`` (only its own: a blur setting must not change the crop store's key)."""
    given = {
        "overlay": {"alpha": settings.overlay_alpha},
        "blur": {"sigma": settings.blur_sigma},
        "crop": {"margin": settings.crop_margin},
        "attention": {"strength": settings.attention_strength, "layers": settings.attention_layers},
    }
    return steering_params(mode, **given.get(mode, {}))


def feature_store_spec(encoder_description: dict, mode: str, params: dict, mask_store_key: str | None, dtype: str) -> dict:
    return {"format": FEATURE_STORE_FORMAT, "encoder": encoder_description, "mode": mode, "steering": params,
            "mask_store": mask_store_key, "dtype": dtype}


def steer(image: np.ndarray, roi: np.ndarray | None, labels: np.ndarray | None, mode: str, params: dict,
          grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The image the encoder sees under ``mode`` and the ROI weight of each of its patches."""
    if roi is None:
        return image, np.zeros(grid[0] * grid[1], dtype=np.float32)
    steered = steer_image(image, roi, labels, mode, **params)
    if mode == "crop" and roi.any():
        top, bottom, left, right = crop_box(roi, image.shape[:2], params["margin"])
        roi_in_view = resize_mask_nearest(roi, image.shape[:2])[top:bottom, left:right]
    else:
        roi_in_view = roi
    return steered, roi_patch_weights(roi_in_view, grid, steered.shape)


def _encode_chunk(items: list[WorkItem], context: dict) -> list[Outcome]:
    set_torch_threads(context["workers"])
    options = context["encoder"]
    encoder = per_thread_model(json.dumps(options, sort_keys=True), lambda: create_encoder(**options))
    store = ImageStore(context["store_url"])
    masks = ImageStore(context["mask_store_url"], read_only=True) if context["mask_store_url"] else None
    mode, params, dtype = context["mode"], context["params"], np.dtype(context["dtype"])
    outcomes: list[Outcome] = []
    for start in range(0, len(items), context["batch_size"]):
        batch_items, tensors, weights = [], [], []
        for item in items[start : start + context["batch_size"]]:
            try:
                image = load_image(item.path)
                roi = labels = None
                if masks is not None:
                    arrays, _ = masks.read_image(item.hash, ("roi", "labels"))
                    roi, labels = arrays["roi"], arrays["labels"]
                steered, patch_weights = steer(image, roi, labels, mode, params, encoder.grid)
                tensors.append(encoder.preprocess(steered))
                weights.append(patch_weights)
                batch_items.append(item)
            except Exception as error:  # this image fails; the batch goes on
                outcomes.append(Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}"))
        if not batch_items:
            continue
        try:
            roi_weights = torch.from_numpy(np.stack(weights))
            bias = attention_bias(roi_weights, params["strength"]) if mode == "attention" else None
            with torch.inference_mode():
                global_embedding, patch_tokens = encoder.encode_images(torch.stack(tensors), patch_bias=bias)
            for index, item in enumerate(batch_items):
                store.write_image(item.hash, {
                    "global": global_embedding[index].float().numpy().astype(dtype),
                    "patches": patch_tokens[index].float().numpy().astype(dtype),
                    "roi_weights": weights[index].astype(np.float32),
                })
                outcomes.append(Outcome(item.hash, item.path, True))
        except Exception as error:
            outcomes.extend(Outcome(i.hash, i.path, False, f"{type(error).__name__}: {error}") for i in batch_items)
    return outcomes


def write_text_embeddings(store: ImageStore, encoder, prepared: PreparedDataset) -> None:
    """Every prompt of every class, embedded once per store (flat, with the class of each row in the attributes)."""
    if not encoder.has_text or store.has_shared("text"):
        return
    prompts, classes = [], []
    for class_index, name in enumerate(prepared.class_names):
        for prompt in prepared.prompts[name]:
            prompts.append(prompt)
            classes.append(class_index)
    with torch.inference_mode():
        embeddings = encoder.encode_text(prompts).float().numpy()
    store.write_shared("text", embeddings, {"prompts": prompts, "class_index": classes, "class_names": prepared.class_names})


def open_feature_store(spec: DatasetSpec, params: Params, paths: DatasetPaths, mode: str, encoder) -> tuple[ImageStore, str | None]:
    settings = params.features
    mask_store = None if mode in MODES_WITHOUT_MASKS else current_mask_store(spec, params, paths)
    store_spec = feature_store_spec(encoder.describe(), mode, mode_params(settings, mode),
                                    mask_store.key if mask_store else None, settings.dtype)
    key = store_key(store_spec)
    url = paths.store_url("features", key, settings.store_root)
    provenance = {"versions": package_versions(), "weights_source": encoder.weights_source,
                  "mask_store_url": mask_store.url if mask_store else None}
    return ImageStore.create_or_open(url, key, store_spec, provenance), (mask_store.url if mask_store else None)


def features(spec: DatasetSpec, params: Params, paths: DatasetPaths, modes: list[str] | None = None, progress: bool = True) -> dict:
    """Encode what is not in each mode's store yet; write ``features.json`` (one entry per mode); return it."""
    settings = params.features
    prepared = load_prepared(spec, params, paths, progress=progress)
    options = encoder_options(settings)
    encoder = create_encoder(**options)
    weights_source = encoder.weights_source
    random_init = is_random_init(weights_source)
    if random_init:
        log.warning("=" * 78)
        log.warning("RANDOM-INIT ENCODER: %s has no pretrained weights here; every feature store and result made from it "
                    "is marked random-init and is NOT a real result", settings.model)
        log.warning("=" * 78)
    per_mode = {}
    for mode in modes or settings.modes:
        store, mask_store_url = open_feature_store(spec, params, paths, mode, encoder)
        write_text_embeddings(store, encoder, prepared)
        run = run_incremental(
            prepared.work_items(),
            store.done,
            _encode_chunk,
            {"encoder": options, "store_url": store.url, "mask_store_url": mask_store_url, "mode": mode,
             "params": mode_params(settings, mode), "dtype": settings.dtype, "batch_size": settings.batch_size,
             "workers": settings.workers},
            scheduler=settings.scheduler,
            workers=settings.workers,
            chunk_size=settings.chunk_size,
            description=f"features {spec.name} [{mode}]",
            progress=progress,
        )
        for failure in run.failed:
            log.warning("feature extraction (%s) failed for %s: %s", mode, failure["path"], failure["reason"])
        per_mode[mode] = run.to_dict() | {"store": store.url, "store_key": store.key, "encoder_options": options,
                                          "steering": mode_params(settings, mode)}
    totals = {k: sum(m[k] for m in per_mode.values()) for k in ("total", "processed", "skipped", "failed_count")}
    seconds = sum(m["seconds"] for m in per_mode.values())
    summary = {
        "stage": "features",
        "dataset": spec.name,
        **totals,
        "failed": [f | {"mode": mode} for mode, m in per_mode.items() for f in m["failed"]],
        "seconds": round(seconds, 3),
        "images_per_s": round(totals["processed"] / seconds, 3) if seconds > 0 else 0.0,
        "weights_source": weights_source,
        "random_init": random_init,
        "encoder": encoder.describe(),
        "modes": per_mode,
        "versions": package_versions(),
    }
    if random_init:
        summary["warning"] = f"{RANDOM_INIT}: features come from an encoder without pretrained weights; results are not real"
    write_json(paths.features_summary, summary)
    return summary
