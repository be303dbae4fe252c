"""Finding the weights an open_clip encoder asks for: an open_clip tag, an ``hf-hub:`` repository or a local file.

Downloads go through open_clip / huggingface_hub, so a filled Hugging Face cache (``HF_HOME``, default
``~/.cache/huggingface``) is used as is, and ``HF_HUB_OFFLINE=1`` makes a cache miss fail at once instead of after
the hub client's retries (about 25 s per file on a machine without network).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
from open_clip.pretrained import download_pretrained_from_hf

from medfocus.pipeline.hub import offline_unless_hub_reachable

from .base import RANDOM_INIT, PretrainedWeightsUnavailable


HF_HUB_PREFIX = "hf-hub:"
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

# The tag ``pretrained="auto"`` means for a built-in model; models not listed take 'openai' if open_clip has it,
# else open_clip's first tag for the model.
DEFAULT_PRETRAINED_TAGS = {
    "ViT-B-32": "openai",
    "ViT-B-16": "openai",
    "ViT-L-14": "openai",
    "ViT-B-32-quickgelu": "openai",
    "ViT-B-16-SigLIP": "webli",
}

HOW_TO_PROVIDE_WEIGHTS = (
    "Provide the weights in one of these ways: "
    "(1) run once on a machine with internet access (the weights land in the Hugging Face cache, HF_HOME or "
    "~/.cache/huggingface), copy that cache to this machine and set HF_HUB_OFFLINE=1; "
    "(2) pass a local weights file as pretrained (a .pt/.pth/.bin/.safetensors open_clip state dict, e.g. "
    "open_clip_pytorch_model.bin from the model's hub repository); "
    "(3) or accept random init (allow_random_init, or pretrained='none'): every output then says 'random-init'."
)


@dataclass
class WeightsPlan:
    """How to build one open_clip model: the architecture name, the checkpoint to load, and what to call it."""

    model: str
    pretrained: str
    architecture: str
    checkpoint: str | None
    weights_source: str
    force_quick_gelu: bool = False
    preprocess_overrides: dict[str, Any] = field(default_factory=dict)
    unavailable_reason: str | None = None

    @property
    def is_random_init(self) -> bool:
        return self.checkpoint is None


def is_weight_file(spec: str) -> bool:
    return spec.lower().endswith(WEIGHT_FILE_SUFFIXES) or os.path.isfile(spec)


def default_tag(model: str) -> str | None:
    tags = open_clip.list_pretrained_tags_by_model(model)
    preferred = DEFAULT_PRETRAINED_TAGS.get(model)
    if preferred in tags:
        return preferred
    if "openai" in tags:
        return "openai"
    return tags[0] if tags else None


def _local_file(spec: str) -> str:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    return str(path.resolve())


def _tag_preprocess(tag_cfg: dict[str, Any]) -> dict[str, Any]:
    return {key: tag_cfg[key] for key in ("mean", "std", "interpolation") if key in tag_cfg}


def _hub_config(repo_id: str) -> tuple[str, dict[str, Any]]:
    """Fetch (or find cached) ``open_clip_config.json`` of an hf-hub model: (snapshot folder, config)."""
    from huggingface_hub import hf_hub_download

    offline_unless_hub_reachable()
    try:
        config_path = hf_hub_download(repo_id=repo_id, filename="open_clip_config.json")
    except Exception as error:  # huggingface_hub raises a family of network/cache errors
        raise PretrainedWeightsUnavailable(
            f"cannot build hf-hub:{repo_id}: its open_clip_config.json is neither reachable nor in the Hugging Face "
            f"cache ({type(error).__name__}: {error}). Without that config not even a random-init model can be "
            f"built. " + HOW_TO_PROVIDE_WEIGHTS
        ) from error
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    return str(Path(config_path).parent), config


def _unavailable(plan: WeightsPlan, reason: str, allow_random_init: bool) -> WeightsPlan:
    """``auto`` could not get its weights: random init if allowed, else the error that says how to fix it."""
    if not allow_random_init:
        raise PretrainedWeightsUnavailable(
            f"pretrained weights for {plan.model} (pretrained='{plan.pretrained}') are unavailable: {reason}. "
            + HOW_TO_PROVIDE_WEIGHTS
        )
    plan.checkpoint = None
    plan.weights_source = RANDOM_INIT
    plan.unavailable_reason = reason
    return plan


def _download(description: str, fetch) -> tuple[str | None, str | None]:
    """Run a download; (path, None) on success, (None, reason) when the weights can't be had."""
    offline_unless_hub_reachable()
    try:
        return fetch(), None
    except Exception as error:  # open_clip/huggingface_hub/urllib all raise their own types for "not reachable"
        return None, f"downloading {description} failed ({type(error).__name__}: {error})"


def plan_hub_model(model: str, pretrained: str, allow_random_init: bool) -> WeightsPlan:
    repo_id = model[len(HF_HUB_PREFIX):]
    if pretrained not in ("auto", "none") and not is_weight_file(pretrained):
        raise ValueError(
            f"{model} takes its weights from its hub repository: pretrained must be 'auto', 'none' or a local "
            f"weights file, got {pretrained!r}"
        )
    snapshot_dir, config = _hub_config(repo_id)
    plan = WeightsPlan(
        model=model,
        pretrained=pretrained,
        architecture=f"local-dir:{snapshot_dir}",
        checkpoint=None,
        weights_source=RANDOM_INIT,
        preprocess_overrides=dict(config.get("preprocess_cfg", {})),
    )
    if pretrained == "none":
        return plan
    if pretrained != "auto":
        plan.checkpoint = _local_file(pretrained)
        plan.weights_source = f"pretrained:{plan.checkpoint}"
        return plan
    checkpoint, reason = _download(model, lambda: download_pretrained_from_hf(repo_id))
    if checkpoint is None:
        return _unavailable(plan, reason, allow_random_init)
    plan.checkpoint = checkpoint
    plan.weights_source = f"pretrained:{model}"
    return plan


def plan_builtin_model(model: str, pretrained: str, allow_random_init: bool) -> WeightsPlan:
    if model not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {model!r}; use a name from open_clip.list_models() (e.g. ViT-B-32, ViT-B-16), "
            f"an 'hf-hub:org/name' repository, or 'litemedsam'"
        )
    plan = WeightsPlan(model=model, pretrained=pretrained, architecture=model, checkpoint=None,
                       weights_source=RANDOM_INIT)
    if pretrained == "none":
        return plan
    if pretrained.startswith(HF_HUB_PREFIX):
        repo_id = pretrained[len(HF_HUB_PREFIX):]
        checkpoint, reason = _download(pretrained, lambda: download_pretrained_from_hf(repo_id))
        if checkpoint is None:
            raise PretrainedWeightsUnavailable(f"{reason}. " + HOW_TO_PROVIDE_WEIGHTS)
        plan.checkpoint, plan.weights_source = checkpoint, f"pretrained:{pretrained}"
        return plan
    tags = open_clip.list_pretrained_tags_by_model(model)
    tag = default_tag(model) if pretrained == "auto" else pretrained
    if pretrained == "auto" and tag is None:
        return _unavailable(plan, f"open_clip knows no pretrained tag for {model}", allow_random_init)
    if tag in tags:
        tag_cfg = open_clip.get_pretrained_cfg(model, tag)
        # The tag's training activation must be rebuilt (openai weights need QuickGELU), random init included, so
        # that a random-init stand-in has the pretrained model's exact architecture.
        plan.force_quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        plan.preprocess_overrides = _tag_preprocess(tag_cfg)
        checkpoint, reason = _download(f"{model} '{tag}'", lambda: open_clip.download_pretrained(tag_cfg))
        if checkpoint is None:
            if pretrained == "auto":
                return _unavailable(plan, reason, allow_random_init)
            raise PretrainedWeightsUnavailable(f"{reason}. " + HOW_TO_PROVIDE_WEIGHTS)
        plan.checkpoint, plan.weights_source = checkpoint, f"pretrained:{tag}"
        return plan
    if is_weight_file(pretrained):
        plan.checkpoint = _local_file(pretrained)
        plan.weights_source = f"pretrained:{plan.checkpoint}"
        return plan
    raise ValueError(
        f"pretrained={pretrained!r} is neither an open_clip tag of {model} ({', '.join(tags) or 'none'}), an "
        f"'hf-hub:org/name' repository, a weights file, 'auto' nor 'none'"
    )


def plan_open_clip_weights(model: str, pretrained: str, allow_random_init: bool) -> WeightsPlan:
    if model.startswith(HF_HUB_PREFIX):
        return plan_hub_model(model, pretrained, allow_random_init)
    return plan_builtin_model(model, pretrained, allow_random_init)
