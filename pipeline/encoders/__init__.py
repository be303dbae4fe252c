"""medfocus.pipeline.encoders: image + ROI -> global embedding and patch tokens.

``create_encoder`` builds an open_clip, LiteMedSAM or EfficientNet-Lite encoder; ``steering`` holds the ROI
steering modes (``none``, ``overlay``, ``blur``, ``crop``, ``attention``, ``dual``) and their canonical parameters for
the cache key.

Names are imported on first use: the steering helpers and the spec resolvers need neither open_clip nor the models,
and the resolve stage (run on every ``dvc repro``) should not pay for importing them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "base": ("RANDOM_INIT", "ImageEncoder", "PretrainedWeightsUnavailable", "UnsupportedEncoderFeature", "letterbox"),
    "factory": ("create_encoder",),
    "efficientnet": ("EfficientNetLiteEncoder",),
    "litemedsam": ("LiteMedSamEncoder",),
    "open_clip_encoder": ("OpenClipEncoder",),
    "steering": ("DEFAULT_STEERING_PARAMS", "STEERING_MODES", "attention_bias", "crop_box", "resize_mask_nearest",
                 "roi_patch_weights", "steer_image", "steering_params"),
    "weights": ("DEFAULT_PRETRAINED_TAGS", "default_tag"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value
