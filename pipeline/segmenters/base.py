"""What every segmenter returns, and the pieces the backends share.

Frames: a backend decodes masks as logits in the *work frame*, the image stretched to a square of
``WORK_SIZE``² (SAM-style decoders emit 256² low-resolution masks). Results are written at the *store
resolution* S: the whole image stretched to S×S, the same frame the store keeps images in. Box prompts
and bboxes are given as fractions of width/height, so they mean the same thing in every frame.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

WORK_SIZE = 256


@dataclass
class SegmentationResult:
    """Instance labels, the chosen ROI and one record per candidate mask, all at the store resolution.

    ``labels[y, x] == i`` means pixel (x, y) belongs to ``masks[i - 1]``; masks are painted largest first
    so a small mask lying on a large one stays visible. ``roi_index`` is None when no ROI was found, and
    ``roi`` is then all False.
    """

    labels: np.ndarray
    roi: np.ndarray
    masks: list[dict]
    roi_index: int | None
    # The image's encoder embedding summarised for the feature stores (pipeline.medsam_lite.summarize_embedding), when
    # the backend's encoder is also a feature encoder (LiteMedSAM); the segment stage stores it so nothing encodes twice.
    embedding: dict[str, np.ndarray] | None = None


@runtime_checkable
class Segmenter(Protocol):
    def describe(self) -> dict:
        """JSON-able description of everything that changes the masks."""
        ...

    def segment(self, image: np.ndarray) -> SegmentationResult:
        """Segment one (H, W, 3) uint8 RGB image."""
        ...


@dataclass
class Candidate:
    """One candidate mask in the work frame, before it is written at the store resolution."""

    logits: torch.Tensor  # (WORK_SIZE, WORK_SIZE) float32, mask = logits > 0
    score: float  # the decoder's predicted IoU
    stability: float
    source: str
    prompt_box: tuple[float, float, float, float] | None = None  # xyxy fractions; None for point-prompted masks
    policy_score: float = 0.0
    features: dict = field(default_factory=dict)

    @property
    def mask(self) -> torch.Tensor:
        return self.logits > 0

    def float_copy(self) -> Candidate:
        """A copy with float32 logits and its own features dict (scoring writes into both)."""
        return dataclasses.replace(self, logits=self.logits.float(), features=dict(self.features))


def stability_scores(logits: torch.Tensor, offset: float = 1.0) -> torch.Tensor:
    """SAM's stability score: IoU of the masks thresholded at +offset and -offset, over the last two dims."""
    inner = (logits > offset).flatten(-2).sum(-1).float()
    outer = (logits > -offset).flatten(-2).sum(-1).float()
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros_like(outer))


def mask_bbox_fractions(mask: np.ndarray) -> list[float]:
    """[x0, y0, x1, y1] of a boolean mask as fractions of width/height (x1, y1 exclusive); zeros when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    height, width = mask.shape
    return [
        float(cols[0] / width),
        float(rows[0] / height),
        float((cols[-1] + 1) / width),
        float((rows[-1] + 1) / height),
    ]


def resize_logits(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (..., h, w) logits to (..., size, size); thresholding after resizing keeps edges smooth."""
    if logits.shape[-1] == size and logits.shape[-2] == size:
        return logits
    leading = logits.shape[:-2]
    flat = logits.reshape(-1, 1, *logits.shape[-2:]).float()
    resized = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
    return resized.reshape(*leading, size, size)


def paint_labels(masks: list[np.ndarray], size: int) -> np.ndarray:
    """uint16 label map where label i is masks[i - 1], painted largest area first."""
    if len(masks) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(masks)} masks do not fit a uint16 label map")
    labels = np.zeros((size, size), dtype=np.uint16)
    order = sorted(range(len(masks)), key=lambda index: -int(masks[index].sum()))
    for index in order:
        labels[masks[index]] = index + 1
    return labels


def assemble_result(candidates: list[Candidate], roi_index: int | None, store_resolution: int) -> SegmentationResult:
    """Write candidates at the store resolution; ``roi_index`` indexes ``candidates``."""
    masks: list[np.ndarray] = []
    records: list[dict] = []
    for label, candidate in enumerate(candidates, start=1):
        mask = (resize_logits(candidate.logits, store_resolution) > 0).cpu().numpy()
        masks.append(mask)
        records.append(
            {
                "label": label,
                "score": float(candidate.score),
                "stability": float(candidate.stability),
                "area": float(mask.mean()),
                "bbox": mask_bbox_fractions(mask),
                "source": candidate.source,
                "is_roi": label - 1 == roi_index,
                "policy_score": float(candidate.policy_score),
            }
        )
    roi = masks[roi_index].copy() if roi_index is not None else np.zeros((store_resolution, store_resolution), bool)
    return SegmentationResult(
        labels=paint_labels(masks, store_resolution), roi=roi, masks=records, roi_index=roi_index
    )


def check_image(image: np.ndarray) -> np.ndarray:
    """Reject anything that is not an (H, W, 3) uint8 RGB array, before a model sees it."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", None)
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {shape} dtype {dtype}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    return image
