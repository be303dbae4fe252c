"""The features stage: images (+ their ROI from the mask store) through a frozen encoder once, into Zarr.

One store per ROI steering mode, at ``cache/<dataset>/features/<key>.zarr``; the key hashes the store's spec
(pipeline.specs: the encoder and its resolved weights sha256, the mode and its parameters, the mask store's key where
masks or the stored embedding are used, the dtype, the code that computes features). Per image: ``global`` (D),
``patches`` (L × D), ``roi_weights`` (L), and in mode ``dual`` also ``roi_global`` (D, the ROI view: the encoder's
tokens pooled over the ROI). Once per store: the text embedding of every class prompt (``shared/text``) for encoders
with a text tower, rewritten whenever the prompts change.

With LiteMedSAM (the offline default) the modes ``none`` and ``dual`` cost no encoder pass: the segment stage stored
each image's embedding with its masks, and this stage copies it. Other modes and encoders encode here; the encoder is
built in each worker from the driver's resolved spec (no second hub look-up) and checked against it.

Outputs: ``features.json`` (content only: what each store holds; DVC's dependency of later stages) and
``features.run.json`` (how the run went).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.encoders import (
    ImageEncoder,
    UnsupportedEncoderFeature,
    attention_bias,
    create_encoder,
    crop_box,
    letterbox,
    resize_mask_nearest,
    roi_patch_weights,
    steer_image,
)
from medfocus.pipeline.encoders.weights import HOW_TO_PROVIDE_WEIGHTS, WeightsPlan
from medfocus.pipeline.manifest import write_json
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.provenance import RANDOM_INIT, package_versions
from medfocus.pipeline.runner import Outcome, WorkItem, run_incremental
from medfocus.pipeline.specs import LITEMEDSAM, EncoderSpec, FeatureStoreSpec, FeaturesSpec, resolve_encoder
from medfocus.pipeline.store import FeatureStore, MaskStore, canonical_json

from .common import (
    check_same_model,
    done_digest,
    load_manifest_image,
    load_prepared,
    per_thread_model,
    run_file,
    set_torch_threads,
)
from .stores import current_mask_store, feature_store_url, resolve_features_for

log = logging.getLogger(__name__)


def build_encoder(build: dict) -> ImageEncoder:
    """The encoder of a resolved spec's build options: exactly the driver's weights, no second hub request."""
    options = dict(build)
    plan = options.pop("weights_plan", None)
    checkpoint = plan and plan["checkpoint"]
    if checkpoint is not None and not Path(checkpoint).is_file():
        # A remote worker without the driver's weights file finds its own (checked against the driver's afterwards).
        options.pop("weights_sha256")
        return create_encoder(**options)
    if plan is not None:
        options["weights_plan"] = WeightsPlan(**plan)
    return create_encoder(**options)


def shared_encoder(build: dict) -> ImageEncoder:
    """The encoder of a spec, one per thread (the driver's is reused by work that runs in its thread)."""
    return per_thread_model("encoder:" + canonical_json(build), lambda: build_encoder(build))


def steer(image: np.ndarray, roi: np.ndarray | None, labels: np.ndarray | None, mode: str, params: dict,
          encoder: ImageEncoder) -> tuple[np.ndarray, np.ndarray]:
    """The image the encoder sees under ``mode`` and the ROI weight of each of its patches."""
    if roi is None:
        return image, np.zeros(encoder.grid[0] * encoder.grid[1], dtype=np.float32)
    steered = steer_image(image, roi, labels, mode, **params)
    if mode == "crop" and roi.any():
        top, bottom, left, right = crop_box(roi, image.shape[:2], params["margin"])
        roi_in_view = resize_mask_nearest(roi, image.shape[:2])[top:bottom, left:right]
    else:
        roi_in_view = roi
    return steered, roi_patch_weights(roi_in_view, encoder.grid, steered.shape, placement=encoder.placement)


def roi_pooled(patch_tokens: np.ndarray, roi_weights: np.ndarray, global_embedding: np.ndarray) -> np.ndarray:
    """The ROI view of an encoder without a finer map: its patch tokens averaged with the ROI weights (B, D).

    An image without ROI gets its global embedding, so the ROI view never invents a region.
    """
    totals = roi_weights.sum(axis=1, keepdims=True)
    pooled = np.einsum("bl,bld->bd", roi_weights, patch_tokens) / np.maximum(totals, 1e-6)
    return np.where(totals > 0, pooled, global_embedding)


def encode_steered(encoder: ImageEncoder, batch: torch.Tensor, roi_weights: np.ndarray, mode: str,
                   params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Global embeddings (B, D) and patch tokens (B, L, D) of preprocessed, steered images, as float32 arrays."""
    bias = attention_bias(torch.from_numpy(roi_weights), params["strength"]) if mode == "attention" else None
    with torch.inference_mode():
        global_embedding, patch_tokens = encoder.encode_images(batch, patch_bias=bias)
    return global_embedding.float().cpu().numpy(), patch_tokens.float().cpu().numpy()


def _encode_batch(encoder: ImageEncoder, images: list[np.ndarray], rois: list[np.ndarray | None],
                  labels: list[np.ndarray | None], mode: str, params: dict) -> list[dict[str, np.ndarray]]:
    """Every stored array of a batch of images under ``mode``."""
    if mode == "dual" and encoder.family == LITEMEDSAM:
        # LiteMedSAM pools the ROI view from its full 64² map, exactly as the segment stage does when it stores it.
        embeddings = encoder.embed(torch.stack([encoder.preprocess(image) for image in images]))
        return [encoder.summarize(embedding, image.shape[:2], roi) for embedding, image, roi in zip(embeddings, images, rois)]
    steered = [steer(image, roi, label, mode, params, encoder) for image, roi, label in zip(images, rois, labels)]
    weights = np.stack([w for _, w in steered])
    global_embedding, patch_tokens = encode_steered(encoder, torch.stack([encoder.preprocess(s) for s, _ in steered]),
                                                    weights, mode, params)
    arrays = [{"global": g, "patches": p, "roi_weights": w} for g, p, w in zip(global_embedding, patch_tokens, weights)]
    if mode == "dual":
        for row, pooled in zip(arrays, roi_pooled(patch_tokens, weights, global_embedding)):
            row["roi_global"] = pooled
    return arrays


def _from_mask_store(store_arrays: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """A LiteMedSAM feature row made from the embedding the segment stage stored (mode none drops the ROI)."""
    if mode == "none":
        return {"global": store_arrays["global"], "patches": store_arrays["patches"],
                "roi_weights": np.zeros_like(store_arrays["roi_weights"])}
    return dict(store_arrays)


def image_features(encoder: ImageEncoder, image: np.ndarray, segmentation, mode: str,
                   store_spec: FeatureStoreSpec) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One image's arrays as ``store_spec``'s store holds them (for images outside the dataset: predict), and the
    picture the encoder saw. ``segmentation``: the segmenter's result for the image, None for modes without masks."""
    params = store_spec.content["steering"]
    if store_spec.from_mask_store_embedding:
        return _from_mask_store(segmentation.embedding, mode), image
    roi, labels = (segmentation.roi, segmentation.labels) if segmentation is not None else (None, None)
    seen, _ = steer(image, roi, labels, mode, params, encoder)
    return _encode_batch(encoder, [image], [roi], [labels], mode, params)[0], seen


def encoder_view(encoder: ImageEncoder, image: np.ndarray) -> np.ndarray:
    """The square picture an encoder's patch grid lies on: ``image`` fitted into its input the encoder's way."""
    if encoder.placement == "centre":
        return letterbox(image, encoder.image_size, Image.Resampling.BILINEAR)
    height, width = image.shape[:2]
    scale = encoder.image_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = np.zeros((encoder.image_size, encoder.image_size, 3), dtype=np.uint8)
    canvas[: size[1], : size[0]] = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    return canvas


def _features_chunk(items: list[WorkItem], context: dict) -> list[Outcome]:
    set_torch_threads(context["workers"])
    store = FeatureStore(context["store_url"])
    masks = MaskStore(context["mask_store_url"], read_only=True) if context["mask_store_url"] else None
    mode, params, dtype = context["mode"], context["params"], np.dtype(context["dtype"])
    if context["from_mask_store"]:
        outcomes = []
        for item in items:
            try:
                store.write_features(item.hash, _from_mask_store(masks.read_embedding(item.hash), mode), dtype)
                outcomes.append(Outcome(item.hash, item.path, True))
            except Exception as error:  # this image fails, with its reason; the rest go on
                outcomes.append(Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}"))
        return outcomes
    try:
        encoder = shared_encoder(context["build"])
        check_same_model({"weights_sha256": encoder.describe()["weights_sha256"]},
                         {"weights_sha256": context["weights_sha256"]}, "encoder")
    except Exception as error:  # a worker that cannot build the driver's encoder fails its images, with the reason
        return [Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}") for item in items]
    outcomes: list[Outcome] = []
    # Zarr writes mostly wait on storage: one writer thread stores batch n while batch n + 1 is read and encoded.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for start in range(0, len(items), context["batch_size"]):
            batch_items, images, rois, labels = [], [], [], []
            for item in items[start : start + context["batch_size"]]:
                try:
                    image = load_manifest_image(item)
                    roi, label = masks.read_masks(item.hash) if masks is not None else (None, None)
                except Exception as error:  # this image fails; the batch goes on
                    outcomes.append(Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}"))
                    continue
                images.append(image)
                rois.append(roi)
                labels.append(label)
                batch_items.append(item)
            if not batch_items:
                continue
            try:
                rows = _encode_batch(encoder, images, rois, labels, mode, params)
            except Exception as error:
                outcomes.extend(Outcome(i.hash, i.path, False, f"{type(error).__name__}: {error}") for i in batch_items)
                continue
            if pending is not None:
                outcomes.extend(pending.result())
            pending = writer.submit(_write_batch, store, batch_items, rows, dtype)
        if pending is not None:
            outcomes.extend(pending.result())
    return outcomes


def _write_batch(store: FeatureStore, items: list[WorkItem], rows: list[dict[str, np.ndarray]],
                 dtype: np.dtype) -> list[Outcome]:
    """Store each encoded image (its completion flag last); an image whose write fails is reported, the rest go on."""
    outcomes = []
    for item, arrays in zip(items, rows):
        try:
            store.write_features(item.hash, arrays, dtype)
            outcomes.append(Outcome(item.hash, item.path, True))
        except Exception as error:
            outcomes.append(Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}"))
    return outcomes


def write_text_embeddings(store: FeatureStore, spec: FeaturesSpec) -> None:
    """Every prompt of every class, embedded once per store and again whenever the prompts change."""
    if spec.text is None or store.text_matches(spec.text):
        return
    prompts, classes = [], []
    for class_index, name in enumerate(spec.text["class_names"]):
        for prompt in spec.text["prompts"][name]:
            prompts.append(prompt)
            classes.append(class_index)
    encoder = shared_encoder(spec.encoder.build)
    with torch.inference_mode():
        embeddings = encoder.encode_text(prompts).float().numpy()
    store.write_text(spec.text, embeddings, classes, prompts)


def _warn_random_init(encoder: EncoderSpec) -> None:
    reason = encoder.build.get("weights_plan", {}).get("unavailable_reason")
    cause = f"its pretrained weights could not be had ({reason})" if reason else "it was asked for without weights"
    log.warning(
        "\n%s\nRANDOM-INIT ENCODER: %s is randomly initialised: %s. Every feature store and result made from it is "
        "marked random-init and is NOT a real result.%s\n%s",
        "!" * 100, encoder.identity["model"], cause, f"\n{HOW_TO_PROVIDE_WEIGHTS}" if reason else "", "!" * 100,
    )


def features(dataset: DatasetSpec, params: Params, paths: DatasetPaths, modes: list[str] | None = None,
             progress: bool = True) -> dict:
    """Make what is missing in each mode's store; write ``features.json`` and ``features.run.json``; return both merged.

    The encoder's weights are resolved once, here; workers rebuild the same encoder from that resolution.
    """
    settings = params.features
    modes = list(modes or settings.modes)
    prepared = load_prepared(dataset, params, paths, progress=progress)
    encoder = resolve_encoder(settings)
    if encoder.note:
        log.info("%s", encoder.note)
    if "attention" in modes and encoder.family == LITEMEDSAM:
        raise UnsupportedEncoderFeature(
            "mode 'attention' biases the attention inside a ViT, and litemedsam has none to bias: "
            "use the modes none, dual, overlay, blur or crop with it"
        )
    if encoder.random_init:
        _warn_random_init(encoder)
    spec = resolve_features_for(dataset, params, prepared, modes, encoder)
    content_modes, run_modes = {}, {}
    for mode, store_spec in spec.stores.items():
        mask_store = current_mask_store(dataset, params, paths, spec.segment) if store_spec.mask_store_key else None
        store = FeatureStore.create(feature_store_url(paths, store_spec, params), store_spec.key, store_spec.content,
                                    {"versions": package_versions(), "weights_source": encoder.weights_source,
                                     "mask_store_url": mask_store.url if mask_store else None})
        write_text_embeddings(store, spec)
        run = run_incremental(
            prepared.work_items(),
            store.done,
            _features_chunk,
            {"build": encoder.build, "weights_sha256": encoder.identity["weights_sha256"], "store_url": store.url,
             "mask_store_url": mask_store.url if mask_store else None, "mode": mode,
             "from_mask_store": store_spec.from_mask_store_embedding, "params": store_spec.content["steering"],
             "dtype": settings.dtype, "batch_size": settings.batch_size, "workers": settings.workers},
            scheduler=settings.scheduler,
            workers=settings.workers,
            chunk_size=settings.chunk_size,
            description=f"features {dataset.name} [{mode}]",
            progress=progress,
        )
        for failure in run.failed:
            log.warning("feature extraction (%s) failed for %s: %s", mode, failure["path"], failure["reason"])
        done = store.done([entry.hash for entry in prepared.entries])
        failed = [f | {"mode": mode} for f in run.failed + prepared.unreadable()]
        content_modes[mode] = {"store_key": store_spec.key, "steering": store_spec.content["steering"],
                               "mask_store_key": store_spec.mask_store_key,
                               "embedding_source": store_spec.content["embedding_source"], "done": len(done),
                               "done_digest": done_digest(done), "failed": failed}
        counts = run.to_dict()
        run_modes[mode] = {key: counts[key] for key in ("processed", "skipped", "seconds", "images_per_s")} | {"store": store.url}
    content = {
        "stage": "features",
        "dataset": dataset.name,
        "encoder": encoder.identity,
        "encoder_choice": encoder.note or f"features.model {settings.model}",
        "weights_source": encoder.weights_source,
        "random_init": encoder.random_init,
        "text": spec.text,
        "total": len(prepared.entries) + len(prepared.unreadable()),
        "modes": content_modes,
        "failed": [f for m in content_modes.values() for f in m["failed"]],
    }
    content["failed_count"] = len(content["failed"])
    if encoder.random_init:
        content["warning"] = f"{RANDOM_INIT}: features come from an encoder without pretrained weights; results are not real"
    write_json(paths.features_summary, content)
    seconds = sum(m["seconds"] for m in run_modes.values())
    processed = sum(m["processed"] for m in run_modes.values())
    run_summary = {"processed": processed, "skipped": sum(m["skipped"] for m in run_modes.values()),
                   "seconds": round(seconds, 3), "images_per_s": round(processed / seconds, 3) if seconds > 0 else 0.0,
                   "scheduler": settings.scheduler, "workers": settings.workers, "modes": run_modes,
                   "versions": package_versions()}
    write_json(run_file(paths.features_summary), run_summary)
    merged_modes = {mode: content_modes[mode] | run_modes[mode] for mode in content_modes}
    return content | run_summary | {"modes": merged_modes}
