"""``create_segmenter``: one entry point for every backend, configured by name and keyword options."""

from __future__ import annotations

from medfocus.pipeline.segmenters.base import Segmenter
from medfocus.pipeline.segmenters.litemedsam import LiteMedSAMSegmenter
from medfocus.pipeline.segmenters.sam2_segmenter import Sam2Segmenter

from medfocus.pipeline.vocabulary import SEGMENTER_BACKENDS

BACKENDS = dict(zip(SEGMENTER_BACKENDS, (LiteMedSAMSegmenter, Sam2Segmenter)))


def list_backends() -> list[str]:
    return sorted(BACKENDS)


def create_segmenter(
    backend: str,
    *,
    policy: str,
    store_resolution: int = 256,
    device: str = "cpu",
    allow_random_init: bool = False,
    **backend_options,
) -> Segmenter:
    """Build a segmenter. ``policy`` is an ROI policy: a built-in name, a policy file, a description (a spec's) or a
    ``RoiPolicy`` (``policies.get_policy``); ``backend_options`` go to
    the backend (litemedsam: ``pretrained``; sam2: ``model_size``, ``checkpoint``, ``mode``, ``image_size``,
    ``points_per_side``, ``points_per_batch``, ``pred_iou_thresh``, ``stability_score_thresh``,
    ``box_nms_thresh``, ``pretrained``)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown segmenter backend {backend!r}; choose one of {list_backends()}")
    if store_resolution < 8:
        raise ValueError(f"store_resolution must be at least 8, got {store_resolution}")
    return BACKENDS[backend](
        policy=policy,
        store_resolution=store_resolution,
        device=device,
        allow_random_init=allow_random_init,
        **backend_options,
    )
