"""The features stage: images (+ their ROI from the mask store) through a frozen encoder once, into Zarr.

One store per ROI steering mode, at ``cache/<dataset>/features/<key>.zarr``; the key hashes the encoder's identity
(model, weights source and checksum, image size), the mode and its parameters, the mask store's key (for modes that
use masks) and the stored dtype. Per image: ``global`` (D), ``patches`` (L × D), ``roi_weights`` (L). Once per store:
the text embedding of every class prompt (``shared/text``), when the encoder has a text tower.

The encoder's weights are resolved once, by the driver; every worker rebuilds that same encoder from the resolution
(see :func:`resolve_encoder`) and checks its description against the driver's before it encodes anything.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from medfocus.pipeline.config import FeaturesParams, Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.encoders import (
    ImageEncoder,
    UnsupportedEncoderFeature,
    attention_bias,
    create_encoder,
    crop_box,
    resize_mask_nearest,
    roi_patch_weights,
    steer_image,
    steering_params,
)
from medfocus.pipeline.encoders.factory import LITEMEDSAM
from medfocus.pipeline.encoders.steering import canonical_layers
from medfocus.pipeline.encoders.weights import HOW_TO_PROVIDE_WEIGHTS, WeightsPlan, plan_open_clip_weights
from medfocus.pipeline.manifest import write_json
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.provenance import RANDOM_INIT, is_random_init, package_versions
from medfocus.pipeline.runner import Outcome, WorkItem, run_incremental
from medfocus.pipeline.store import ImageStore, IncompleteImageError, canonical_json, store_key

from .common import (
    PreparedDataset,
    check_same_model,
    load_manifest_image,
    load_prepared,
    per_thread_model,
    set_torch_threads,
)
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


def resolve_encoder(options: dict) -> tuple[ImageEncoder, dict]:
    """Build the encoder of ``options`` here, once, and the recipe that rebuilds exactly it in a worker.

    Resolving ``pretrained`` (``auto`` above all) may download, or offline wait for the hub client's retries; a worker
    that resolved it again would repeat that. The recipe carries the resolved weights plan instead: the checkpoint file
    found, or none for the seeded random init, together with what the plan chose besides the file (QuickGELU for
    openai weights, the tag's preprocessing), so that a random-init fallback is the very model the driver built.
    """
    if options["model"].lower() == LITEMEDSAM:
        recipe = {"options": options, "plan": None}  # its weights ship inside its package: nothing to resolve
    else:
        plan = plan_open_clip_weights(options["model"], options["pretrained"], options["allow_random_init"])
        recipe = {"options": options, "plan": asdict(plan)}
    encoder = shared_encoder(recipe)
    recipe["encoder"] = encoder.describe()
    return encoder, recipe


def _encoder_from_recipe(recipe: dict) -> ImageEncoder:
    plan = recipe["plan"]
    if plan is None:  # LiteMedSAM: its weights ship inside its package
        return create_encoder(**recipe["options"])
    if plan["checkpoint"] is not None and not Path(plan["checkpoint"]).is_file():
        # A remote worker without the driver's weights file finds its own (checked against the driver's afterwards).
        return create_encoder(**recipe["options"])
    known_sha256 = recipe.get("encoder", {}).get("weights_sha256")
    return create_encoder(**recipe["options"], weights_plan=WeightsPlan(**plan), weights_sha256=known_sha256)


def shared_encoder(recipe: dict) -> ImageEncoder:
    """The encoder of a recipe, one per thread (the driver's is reused by work that runs in its thread)."""
    key = "encoder:" + canonical_json({"options": recipe["options"], "plan": recipe["plan"]})
    return per_thread_model(key, lambda: _encoder_from_recipe(recipe))


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


def read_masks(masks: ImageStore, digest: str) -> tuple[np.ndarray, np.ndarray]:
    """An image's ROI and label map, or an error saying why there are none."""
    try:
        arrays, _ = masks.read_image(digest, ("roi", "labels"))
    except IncompleteImageError:
        raise IncompleteImageError(
            f"no masks for this image in {masks.url}: its segmentation failed or was interrupted (see segment.json); "
            "rerun `medfocus segment`"
        ) from None
    return arrays["roi"], arrays["labels"]


def _encode_chunk(items: list[WorkItem], context: dict) -> list[Outcome]:
    set_torch_threads(context["workers"])
    try:
        encoder = shared_encoder(context["recipe"])
        check_same_model(encoder.describe(), context["recipe"]["encoder"], "encoder")
    except Exception as error:  # a worker that cannot build the driver's encoder fails its images, with the reason
        return [Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}") for item in items]
    store = ImageStore(context["store_url"])
    masks = ImageStore(context["mask_store_url"], read_only=True) if context["mask_store_url"] else None
    mode, params, dtype = context["mode"], context["params"], np.dtype(context["dtype"])
    outcomes: list[Outcome] = []
    # Zarr writes mostly wait on storage: one writer thread stores batch n while batch n + 1 is read and encoded.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for start in range(0, len(items), context["batch_size"]):
            batch_items, tensors, weights = [], [], []
            for item in items[start : start + context["batch_size"]]:
                try:
                    image = load_manifest_image(item)
                    roi, labels = read_masks(masks, item.hash) if masks is not None else (None, None)
                    steered, patch_weights = steer(image, roi, labels, mode, params, encoder.grid)
                    tensors.append(encoder.preprocess(steered))
                    weights.append(patch_weights)
                    batch_items.append(item)
                except Exception as error:  # this image fails; the batch goes on
                    outcomes.append(Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}"))
            if not batch_items:
                continue
            try:
                encoded = encode_steered(encoder, torch.stack(tensors), np.stack(weights), mode, params)
            except Exception as error:
                outcomes.extend(Outcome(i.hash, i.path, False, f"{type(error).__name__}: {error}") for i in batch_items)
                continue
            if pending is not None:
                outcomes.extend(pending.result())
            pending = writer.submit(_write_batch, store, batch_items, *encoded, weights, dtype)
        if pending is not None:
            outcomes.extend(pending.result())
    return outcomes


def _write_batch(store: ImageStore, items: list[WorkItem], global_embedding: np.ndarray, patch_tokens: np.ndarray,
                 weights: list[np.ndarray], dtype: np.dtype) -> list[Outcome]:
    """Store each encoded image (its completion flag last); an image whose write fails is reported, the rest go on."""
    outcomes = []
    for index, item in enumerate(items):
        try:
            store.write_image(item.hash, {
                "global": global_embedding[index].astype(dtype),
                "patches": patch_tokens[index].astype(dtype),
                "roi_weights": weights[index].astype(np.float32),
            })
            outcomes.append(Outcome(item.hash, item.path, True))
        except Exception as error:
            outcomes.append(Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}"))
    return outcomes


def encode_steered(encoder: ImageEncoder, batch: torch.Tensor, roi_weights: np.ndarray, mode: str,
                   params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Global embeddings (B, D) and patch tokens (B, L, D) of preprocessed, steered images, as float32 arrays."""
    bias = attention_bias(torch.from_numpy(roi_weights), params["strength"]) if mode == "attention" else None
    with torch.inference_mode():
        global_embedding, patch_tokens = encoder.encode_images(batch, patch_bias=bias)
    return global_embedding.float().cpu().numpy(), patch_tokens.float().cpu().numpy()


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


def _warn_random_init(model: str, plan: dict | None) -> None:
    reason = plan.get("unavailable_reason") if plan else None
    cause = f"its pretrained weights could not be had ({reason})" if reason else "it was asked for without weights"
    log.warning(
        "\n%s\nRANDOM-INIT ENCODER: %s is randomly initialised: %s. Every feature store and result made from it is "
        "marked random-init and is NOT a real result.%s\n%s",
        "!" * 100, model, cause, f"\n{HOW_TO_PROVIDE_WEIGHTS}" if reason else "", "!" * 100,
    )


def features(spec: DatasetSpec, params: Params, paths: DatasetPaths, modes: list[str] | None = None, progress: bool = True) -> dict:
    """Encode what is not in each mode's store yet; write ``features.json`` (one entry per mode); return it.

    The encoder's weights are resolved once, here; workers rebuild the same encoder from that resolution. Modes an
    earlier run made keep their entries (under ``earlier_modes``) when this run computes other modes.
    """
    settings = params.features
    modes = list(modes or settings.modes)
    prepared = load_prepared(spec, params, paths, progress=progress)
    options = encoder_options(settings)
    encoder, recipe = resolve_encoder(options)
    if "attention" in modes and encoder.describe()["family"] == LITEMEDSAM:
        raise UnsupportedEncoderFeature(
            f"mode 'attention' biases the attention inside a ViT, and {settings.model} has none to bias: "
            "use the modes none, overlay, blur or crop with it"
        )
    weights_source = encoder.weights_source
    random_init = is_random_init(weights_source)
    if random_init:
        _warn_random_init(settings.model, recipe["plan"])
    per_mode = {}
    for mode in modes:
        store, mask_store_url = open_feature_store(spec, params, paths, mode, encoder)
        write_text_embeddings(store, encoder, prepared)
        run = run_incremental(
            prepared.work_items(),
            store.done,
            _encode_chunk,
            {"recipe": recipe, "store_url": store.url, "mask_store_url": mask_store_url, "mode": mode,
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
                                          "steering": mode_params(settings, mode), "dtype": settings.dtype,
                                          "mask_store_key": store.attrs["spec"]["mask_store"],
                                          "weights_source": weights_source}
    totals = {k: sum(m[k] for m in per_mode.values()) for k in ("total", "processed", "skipped", "failed_count")}
    seconds = sum(m["seconds"] for m in per_mode.values())
    previous = read_json(paths.features_summary) if paths.features_summary.exists() else {}
    earlier = previous.get("earlier_modes", {}) | previous.get("modes", {})
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
        # Stores of modes an earlier run made and this one did not, so that train and evaluate still find them
        # (current_feature_store refuses any made with other settings).
        "earlier_modes": {mode: entry for mode, entry in earlier.items() if mode not in per_mode},
        "versions": package_versions(),
    }
    if random_init:
        summary["warning"] = f"{RANDOM_INIT}: features come from an encoder without pretrained weights; results are not real"
    write_json(paths.features_summary, summary)
    return summary
