"""medfocus.pipeline.segmenters: SAM-family segmenters that return candidate masks and a chosen ROI.

``create_segmenter(backend, policy=..., ...)`` builds one (backends: ``litemedsam``, ``sam2``); its ``segment``
returns a :class:`SegmentationResult`. ROI policies are documented in :mod:`.policies`; ROI quality against
ground-truth masks is measured by :func:`evaluate_roi`.
"""

from medfocus.pipeline.segmenters.base import SegmentationResult, Segmenter
from medfocus.pipeline.segmenters.factory import create_segmenter, list_backends
from medfocus.pipeline.segmenters.litemedsam import WeightsUnavailableError
from medfocus.pipeline.segmenters.policies import (
    DEFAULT_POLICY_BY_DATASET,
    GENERIC_DEFAULT_POLICY,
    POLICIES,
    RoiPolicy,
    default_policy_for,
    get_policy,
)
from medfocus.pipeline.segmenters.roi_eval import dice_iou, evaluate_roi, split_tune_report

__all__ = [
    "DEFAULT_POLICY_BY_DATASET",
    "GENERIC_DEFAULT_POLICY",
    "POLICIES",
    "RoiPolicy",
    "SegmentationResult",
    "Segmenter",
    "WeightsUnavailableError",
    "create_segmenter",
    "default_policy_for",
    "dice_iou",
    "evaluate_roi",
    "get_policy",
    "list_backends",
    "split_tune_report",
]
