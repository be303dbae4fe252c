"""How an image becomes feature-store rows: the encoder of a resolved spec, the ROI steering of each mode, the ROI view,
and the picture the encoder's patch grid lies on. The features stage runs this over a dataset; predict and the report
run it on single images, so a new image is encoded exactly as the training images were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from medfocus.pipeline.encoders import (
    ImageEncoder,
    attention_bias,
    create_encoder,
    crop_box,
    letterbox,
    resize_mask_nearest,
    roi_patch_weights,
    steer_image,
)
from medfocus.pipeline.encoders.weights import WeightsPlan
from medfocus.pipeline.specs import LITEMEDSAM, FeatureStoreSpec
from medfocus.pipeline.store import canonical_json
from medfocus.pipeline.worker_models import per_thread_model
from PIL import Image


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


def encoder_input(image: np.ndarray, intensity: str) -> np.ndarray:
    """The picture every encoder gets (``features.intensity``): ``none``, the image itself; ``stretch``, the image with
    the grey levels between the 1st and 99th percentile of its foreground (pixels brighter than 10 % of the 99th
    percentile: not the black frame around a scan) mapped linearly onto 0-255, the same map on every colour channel.

    Why: sources differ in brightness and contrast (brain MRI: brain_tumor vs Br35H, benchmarks/README.md), which an
    encoder trained on one source takes for content. A blank or flat image is returned unchanged.
    """
    if intensity == "none":
        return image
    if intensity != "stretch":
        raise ValueError(f"unknown intensity setting {intensity!r}: none or stretch")
    gray = image.astype(np.float32).mean(axis=2)
    foreground = gray > 0.1 * np.percentile(gray, 99)
    if not foreground.any():
        return image
    low, high = np.percentile(gray[foreground], [1, 99])
    if high - low < 1:
        return image
    stretched = (image.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(stretched, 0, 255).round().astype(np.uint8)


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


def encode_batch(encoder: ImageEncoder, images: list[np.ndarray], rois: list[np.ndarray | None],
                  labels: list[np.ndarray | None], mode: str, params: dict) -> list[dict[str, np.ndarray]]:
    """Every stored array of a batch of images under ``mode``."""
    if mode == "dual" and encoder.family == LITEMEDSAM:
        # LiteMedSAM pools the ROI view from its full 64² map, exactly as the segment stage does when it stores it.
        embeddings = encoder.embed(torch.stack([encoder.preprocess(image) for image in images]))
        arrays = [encoder.summarize(embedding, image.shape[:2], roi) for embedding, image, roi in zip(embeddings, images, rois)]
    else:
        steered = [steer(image, roi, label, mode, params, encoder) for image, roi, label in zip(images, rois, labels)]
        weights = np.stack([w for _, w in steered])
        global_embedding, patch_tokens = encode_steered(encoder, torch.stack([encoder.preprocess(s) for s, _ in steered]),
                                                        weights, mode, params)
        arrays = [{"global": g, "patches": p, "roi_weights": w} for g, p, w in zip(global_embedding, patch_tokens, weights)]
        if mode == "dual":
            for row, pooled in zip(arrays, roi_pooled(patch_tokens, weights, global_embedding)):
                row["roi_global"] = pooled
    if mode == "dual" and params.get("roi_view") == "crop":
        for row, zoom in zip(arrays, roi_zoom(encoder, images, rois, labels, params["margin"])):
            row["roi_global"] = zoom if zoom is not None else row["global"]
    return arrays


def roi_zoom(encoder: ImageEncoder, images: list[np.ndarray], rois: list[np.ndarray | None], labels: list[np.ndarray | None],
             margin: float) -> list[np.ndarray | None]:
    """The global embedding of each image's ROI box (with ``margin``) encoded at the encoder's full input size; None
    for an image without ROI (its ROI view is then the whole image, as with the pooled view)."""
    out: list[np.ndarray | None] = [None] * len(images)
    crops = [(index, steer_image(image, roi, label, "crop", margin=margin))
             for index, (image, roi, label) in enumerate(zip(images, rois, labels)) if roi is not None and roi.any()]
    if crops:
        with torch.inference_mode():
            embeddings, _ = encoder.encode_images(torch.stack([encoder.preprocess(crop) for _, crop in crops]))
        for (index, _), embedding in zip(crops, embeddings.float().cpu().numpy()):
            out[index] = embedding
    return out


def from_mask_store(store_arrays: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
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
        return from_mask_store(segmentation.embedding, mode), image
    image = encoder_input(image, store_spec.content["intensity"])
    roi, labels = (segmentation.roi, segmentation.labels) if segmentation is not None else (None, None)
    seen, _ = steer(image, roi, labels, mode, params, encoder)
    return encode_batch(encoder, [image], [roi], [labels], mode, params)[0], seen


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
