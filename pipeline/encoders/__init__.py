"""medfocus.pipeline.encoders: image + ROI -> global embedding and patch tokens.

``create_encoder`` builds an open_clip or LiteMedSAM encoder; ``steering`` holds the ROI steering modes
(``none``, ``overlay``, ``blur``, ``crop``, ``attention``) and their canonical parameters for the cache key.
"""

from .base import (
    RANDOM_INIT,
    ImageEncoder,
    PretrainedWeightsUnavailable,
    UnsupportedEncoderFeature,
    letterbox,
)
from .factory import create_encoder
from .litemedsam import LiteMedSamEncoder
from .open_clip_encoder import OpenClipEncoder
from .steering import (
    DEFAULT_STEERING_PARAMS,
    STEERING_MODES,
    attention_bias,
    crop_box,
    resize_mask_nearest,
    roi_patch_weights,
    steer_image,
    steering_params,
)
from .weights import DEFAULT_PRETRAINED_TAGS, default_tag

__all__ = [
    "DEFAULT_PRETRAINED_TAGS",
    "DEFAULT_STEERING_PARAMS",
    "RANDOM_INIT",
    "STEERING_MODES",
    "ImageEncoder",
    "LiteMedSamEncoder",
    "OpenClipEncoder",
    "PretrainedWeightsUnavailable",
    "UnsupportedEncoderFeature",
    "attention_bias",
    "create_encoder",
    "crop_box",
    "default_tag",
    "letterbox",
    "resize_mask_nearest",
    "roi_patch_weights",
    "steer_image",
    "steering_params",
]
