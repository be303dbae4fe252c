"""medfocus.pipeline.segmenters: SAM-family segmenters that return candidate masks and a chosen ROI.

``create_segmenter(backend, policy=..., ...)`` builds one (backends: ``litemedsam``, ``sam2``); its ``segment``
returns a :class:`SegmentationResult`. ROI policies are policy files (:mod:`.policies`; the built-in ones in
``builtin_policies/``) run by :mod:`.selection`; ROI quality against ground-truth masks or boxes is measured by
:func:`evaluate_roi`, and :mod:`.policy_fit` fits a policy on them (``medfocus roi-fit``).

Names load on first use (PEP 562): describing a policy (the resolve stage, on every ``dvc repro``) must not import
torch, which the segmenters themselves need.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_POLICY_BY_DATASET": "policies",
    "GENERIC_DEFAULT_POLICY": "policies",
    "BUILTIN_POLICY_NAMES": "policies",
    "POLICIES": "policies",
    "PolicyFile": "policies",
    "read_policy_file": "policies",
    "RoiPolicy": "policies",
    "default_policy_for": "policies",
    "get_policy": "policies",
    "SegmentationResult": "base",
    "Segmenter": "base",
    "create_segmenter": "factory",
    "list_backends": "factory",
    "WeightsUnavailableError": "litemedsam",  # defined in medfocus.pipeline.medsam_lite_identity
    "dice_iou": "roi_eval",
    "GroundTruth": "roi_eval",
    "evaluate_roi": "roi_eval",
    "split_tune_report": "roi_eval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
