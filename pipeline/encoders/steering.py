"""ROI steering: the ways a region of interest can steer an image encoder.

Pixel-space modes change the picture before it is encoded:

* ``none``      - the image as it is (plain CLIP).
* ``overlay``   - every mask of the label map painted translucent in its own colour (MedFocusCLIP, paper Fig. 3).
* ``blur``      - everything outside the ROI Gaussian-blurred; ROI pixels are left exactly as they were.
* ``crop``      - the ROI bounding box grown by a margin, made square where the image allows, and cut out.
* ``dual``      - the image as it is, and beside its features an ROI view: the encoder's tokens pooled over the ROI.

``attention`` leaves the pixels alone and acts inside the transformer: :func:`roi_patch_weights` gives the share of
each ViT patch inside the ROI and :func:`attention_bias` turns it into an additive bias on the attention logits of
the patch keys (see :meth:`ImageEncoder.encode_images`).

An empty ROI leaves the image unchanged in every mode (and gives a zero attention bias): with nothing to focus on,
the encoder sees the whole image as plain CLIP would, rather than a blank or fully blurred one.

Masks come at the mask store's resolution (e.g. 256x256, the whole image squashed to a square) and are mapped onto
the image by nearest-neighbour resizing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFilter

if TYPE_CHECKING:
    import torch

from medfocus.pipeline.patch_grid import roi_patch_weights  # noqa: F401  (part of steering's interface)

from medfocus.pipeline.vocabulary import DUAL_ROI_VIEWS, STEERING_MODES

# Defaults of every mode's parameters; the cache key is built from the completed, canonical dict.
DEFAULT_STEERING_PARAMS: dict[str, dict[str, Any]] = {
    "none": {},
    # alpha: opacity of the painted masks (0 = invisible, 1 = solid colour).
    "overlay": {"alpha": 0.4},
    # sigma: Gaussian standard deviation as a fraction of the image's shorter side, so that the blur looks the same
    # on a 256 px ultrasound and a 1024 px radiograph.
    "blur": {"sigma": 0.03},
    # margin: added on every side of the ROI box, as a fraction of the box's longer side.
    "crop": {"margin": 0.1},
    # strength: logit bias of a patch fully outside the ROI (its attention weight shrinks by exp(-strength));
    # layers: transformer blocks that get the bias, "all" or a list of block indices.
    "attention": {"strength": 2.0, "layers": "all"},
    # dual: the whole image as it is, plus an ROI view stored beside it: roi_view "pooled" (the tokens averaged over the
    # ROI) or "crop" (the ROI box, with margin as in crop, encoded on its own).
    "dual": {"roi_view": "pooled", "margin": 0.1},
}

# Distinct, colour-blind-friendly colours (matplotlib's tab10) for the overlay; label k gets colour (k - 1) mod 10.
OVERLAY_PALETTE = np.array(
    [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
        (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    ],
    dtype=np.float32,
)


def canonical_layers(layers: str | int | list[int] | tuple[int, ...]) -> str | list[int]:
    """``"all"``, an index, a list of indices or a comma-separated string -> ``"all"`` or a sorted list of ints."""
    if isinstance(layers, str):
        text = layers.strip().lower()
        if text == "all":
            return "all"
        try:
            layers = [int(part) for part in text.split(",") if part.strip()]
        except ValueError as error:
            raise ValueError(f"attention layers must be 'all' or block indices like '8,9,10,11', got {layers!r}") from error
    elif isinstance(layers, int):
        layers = [layers]
    indices = sorted({int(index) for index in layers})
    if not indices:
        raise ValueError("attention layers: give 'all' or at least one block index")
    return indices


def steering_params(mode: str, **params: Any) -> dict[str, Any]:
    """The mode's parameters with defaults filled in, typed and canonical: the part of the cache key for steering.

    Unknown parameter names are an error, so that a typo can't silently fall back to a default.
    """
    if mode not in STEERING_MODES:
        raise ValueError(f"unknown steering mode {mode!r}; choose one of {', '.join(STEERING_MODES)}")
    defaults = DEFAULT_STEERING_PARAMS[mode]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise ValueError(f"steering mode {mode!r} takes no parameter(s) {unknown}; it takes: {allowed}")
    merged = {**defaults, **params}
    if mode == "overlay":
        alpha = float(merged["alpha"])
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"overlay alpha must lie in [0, 1], got {alpha}")
        return {"alpha": alpha}
    if mode == "blur":
        sigma = float(merged["sigma"])
        if not sigma > 0.0:
            raise ValueError(f"blur sigma (fraction of the shorter image side) must be > 0, got {sigma}")
        return {"sigma": sigma}
    if mode == "crop":
        margin = float(merged["margin"])
        if margin < 0.0:
            raise ValueError(f"crop margin must be >= 0, got {margin}")
        return {"margin": margin}
    if mode == "attention":
        strength = float(merged["strength"])
        if strength < 0.0 or not math.isfinite(strength):
            raise ValueError(f"attention strength must be a finite number >= 0, got {strength}")
        return {"strength": strength, "layers": canonical_layers(merged["layers"])}
    if mode == "dual":
        if merged["roi_view"] not in DUAL_ROI_VIEWS:
            raise ValueError(f"dual roi_view must be one of {', '.join(DUAL_ROI_VIEWS)}, got {merged['roi_view']!r}")
        if merged["roi_view"] == "pooled":
            return {"roi_view": "pooled"}  # the margin plays no part: it must not split the store's key
        margin = float(merged["margin"])
        if margin < 0.0:
            raise ValueError(f"dual crop margin must be >= 0, got {margin}")
        return {"roi_view": "crop", "margin": margin}
    return {}


def resize_mask_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D mask (any dtype) to ``shape``, sampling at pixel centres."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    height, width = shape
    if mask.shape == (height, width):
        return mask
    rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(np.int64), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    return image


def overlay_masks(image: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """Paint every nonzero label of ``labels`` (already at image resolution) translucent in its palette colour."""
    inside = labels > 0
    colours = OVERLAY_PALETTE[(labels[inside].astype(np.int64) - 1) % len(OVERLAY_PALETTE)]
    painted = image.copy()
    mixed = (1.0 - alpha) * image[inside].astype(np.float32) + alpha * colours
    painted[inside] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return painted


def blur_outside(image: np.ndarray, roi: np.ndarray, sigma: float) -> np.ndarray:
    """Blur the pixels outside ``roi`` (at image resolution); ``sigma`` is a fraction of the shorter side."""
    radius = sigma * min(image.shape[:2])
    height, width = image.shape[:2]
    picture = Image.fromarray(image)
    # A wide blur is computed on a copy shrunk so that it is still >= 4 px there, then enlarged: the result is
    # smooth enough for bilinear enlarging to be exact to the eye, at a fraction of the cost on big images.
    factor = max(1, int(radius // 4))
    if factor > 1:
        small = picture.resize((max(1, width // factor), max(1, height // factor)), resample=Image.Resampling.BOX)
        small = small.filter(ImageFilter.GaussianBlur(radius=radius / factor))
        blurred = np.asarray(small.resize((width, height), resample=Image.Resampling.BILINEAR))
    else:
        blurred = np.asarray(picture.filter(ImageFilter.GaussianBlur(radius=radius)))
    return np.where(roi[:, :, None], image, blurred)


def crop_box(roi: np.ndarray, image_shape: tuple[int, int], margin: float) -> tuple[int, int, int, int] | None:
    """The crop of ``crop`` mode as ``(top, bottom, left, right)`` image pixels (bottom/right exclusive).

    The ROI's bounding box (the ROI is at any resolution, mapped onto the image's) grows by ``margin`` times its
    longer side on every side, then its shorter side grows to match the longer one (CLIP encoders see squares).
    A box that sticks out of the image is shifted back inside, and clipped only where it is larger than the image.
    ``None`` for an empty ROI.
    """
    roi = np.asarray(roi, dtype=bool)
    rows = np.flatnonzero(roi.any(axis=1))
    cols = np.flatnonzero(roi.any(axis=0))
    if rows.size == 0:
        return None
    height, width = image_shape
    scale_y, scale_x = height / roi.shape[0], width / roi.shape[1]
    top, bottom = rows[0] * scale_y, (rows[-1] + 1) * scale_y
    left, right = cols[0] * scale_x, (cols[-1] + 1) * scale_x
    pad = margin * max(bottom - top, right - left)
    top, bottom, left, right = top - pad, bottom + pad, left - pad, right + pad
    side = max(bottom - top, right - left)
    centre_y, centre_x = (top + bottom) / 2, (left + right) / 2
    top_px, bottom_px = _fit_span(centre_y - side / 2, centre_y + side / 2, height)
    left_px, right_px = _fit_span(centre_x - side / 2, centre_x + side / 2, width)
    return top_px, bottom_px, left_px, right_px


def _fit_span(start: float, stop: float, limit: int) -> tuple[int, int]:
    """Whole pixels covering ``[start, stop)``, shifted inside ``[0, limit)`` where they stick out, clipped if longer."""
    start, stop = math.floor(start), math.ceil(stop)
    if start < 0:
        start, stop = 0, stop - start
    if stop > limit:
        start, stop = start - (stop - limit), limit
    return max(0, start), stop


def steer_image(image: np.ndarray, roi: np.ndarray, labels: np.ndarray, mode: str, **params: Any) -> np.ndarray:
    """Apply a pixel-space steering ``mode`` to ``image`` (H, W, 3) uint8 RGB.

    ``roi`` (bool) and ``labels`` (uint16, 0 = background) are at mask-store resolution and are resized to the image
    with nearest neighbour. ``none``, ``attention`` and ``dual`` return the image unchanged (attention steers inside the
    encoder), and so does every mode when the ROI is empty (for ``overlay``: when ``labels`` has no mask).
    """
    image = _check_image(image)
    settings = steering_params(mode, **params)
    if mode in ("none", "attention", "dual"):
        return image
    roi = np.asarray(roi, dtype=bool)
    if mode == "overlay":
        labels = np.asarray(labels)
        if not labels.any():
            return image
        return overlay_masks(image, resize_mask_nearest(labels, image.shape[:2]), settings["alpha"])
    if not roi.any():
        return image
    if mode == "blur":
        return blur_outside(image, resize_mask_nearest(roi, image.shape[:2]), settings["sigma"])
    top, bottom, left, right = crop_box(roi, image.shape[:2], settings["margin"])
    return np.ascontiguousarray(image[top:bottom, left:right])


def attention_bias(weights: np.ndarray | torch.Tensor, strength: float) -> torch.Tensor:
    """Patch weights (L,) or (B, L) in [0, 1] -> additive attention-logit bias of the same shape.

    ``bias = strength * (w - 1)``: a patch fully inside the ROI keeps its logit, one fully outside loses
    ``strength`` (its attention weight shrinks by ``exp(-strength)`` against the CLS token and ROI patches), partial
    patches in between, linearly. ``strength = 0`` is plain CLIP. A row with no ROI at all gets zero bias (the
    empty-ROI rule of this module) instead of pushing every patch down against the CLS token.
    """
    import torch  # here, not at the top: the resolve stage reads this module's parameter rules without torch

    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.ndim not in (1, 2):
        raise ValueError(f"patch weights must be (L,) or (B, L), got shape {tuple(weights.shape)}")
    if strength < 0.0:
        raise ValueError(f"attention strength must be >= 0, got {strength}")
    bias = strength * (weights.clamp(0.0, 1.0) - 1.0)
    has_roi = (weights > 0).any(dim=-1, keepdim=True)
    return torch.where(has_roi, bias, torch.zeros_like(bias))
