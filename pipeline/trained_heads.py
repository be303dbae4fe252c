"""Trained heads on disk: saved under a key of everything that determines them, and found again by that key.

A head is determined by the feature store it was trained on (its key names the encoder, weights, ROI mode, steering,
masks and prompts' text), the method, the training subset and seed, every trainer setting, and the classes with their
prompts. Its file is ``models/<method>-<mode>-<subset>-seed<seed>-<key>.pt``: heads of other settings live beside it
instead of overwriting it, and a head trained on other settings is never served for today's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from medfocus.pipeline.cached_features import CachedFeatures, store_identity
from medfocus.pipeline.config import TrainParams
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.preparation import PreparedDataset
from medfocus.pipeline.store import ImageStore, store_key
from medfocus.trainer import FittedModel

log = logging.getLogger(__name__)

HEAD_KEY = "head_key"


class HeadNotFoundError(FileNotFoundError):
    """No saved head matches today's settings (the message lists the heads there are and how to pick one)."""


@dataclass(frozen=True)
class HeadRequest:
    """Which head: the subset and seed it was trained on (the rest of its identity comes from today's settings)."""

    method: str
    mode: str
    fraction: float | None
    shots: int | None
    seed: int

    @classmethod
    def from_settings(cls, settings: TrainParams) -> "HeadRequest":
        shots = settings.shots
        return cls(settings.method, settings.mode, None if shots is not None else settings.fraction, shots, settings.seed)

    @property
    def subset(self) -> str:
        return f"shots{self.shots}" if self.shots is not None else f"frac{self.fraction:g}"


def head_identity(request: HeadRequest, feature_identity: dict, settings: TrainParams, prepared: PreparedDataset) -> dict:
    """Everything that determines a trained head, as the head's saved metadata records it."""
    return {**feature_identity, "dataset": prepared.name, "method": request.method, "fraction": request.fraction,
            "shots": request.shots, "seed": request.seed,
            "trainer_config": settings.trainer_config().model_dump(mode="json", by_alias=True),
            "class_names": prepared.class_names, "prompts": prepared.prompts}


def head_path(paths: DatasetPaths, request: HeadRequest, identity: dict) -> Path:
    return paths.models_dir / f"{request.method}-{request.mode}-{request.subset}-seed{request.seed}-{store_key(identity)}.pt"


def save_head(model: FittedModel, paths: DatasetPaths, request: HeadRequest, cached: CachedFeatures,
              settings: TrainParams, prepared: PreparedDataset) -> Path:
    identity = head_identity(request, cached.identity(), settings, prepared)
    path = head_path(paths, request, identity)
    model.save(path, {**identity, HEAD_KEY: store_key(identity)})
    return path


def _saved_heads(paths: DatasetPaths) -> list[tuple[Path, dict]]:
    heads = []
    for path in sorted(paths.models_dir.glob("*.pt")) if paths.models_dir.is_dir() else []:
        try:
            meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
        except Exception as error:  # an unreadable file is listed as such, never served
            meta = {"unreadable": f"{type(error).__name__}: {error}"}
        heads.append((path, meta))
    return heads


def _json(value):
    return json.loads(json.dumps(value))


def _differences(saved: dict, wanted: dict) -> list[str]:
    return [f"{key}: trained with {saved.get(key)!r}, today {wanted[key]!r}" for key in wanted
            if _json(saved.get(key)) != _json(wanted[key])]


def _without_subset(identity: dict) -> dict:
    return {key: value for key, value in identity.items() if key not in ("fraction", "shots", "seed")}


def load_head(paths: DatasetPaths, request: HeadRequest, store: ImageStore, settings: TrainParams,
              prepared: PreparedDataset, head_file: Path | None = None) -> tuple[FittedModel, Path]:
    """The head today's settings call for, or ``head_file`` after checking it matches them.

    Without ``head_file``: the head saved under today's key; a head of the same method, mode and feature store but
    another subset or seed is taken when it is the only one (it is what ``medfocus train`` just made), and named in the
    log. Otherwise an error lists the heads there are, with what differs, and how to pick one.
    """
    identity = head_identity(request, store_identity(store), settings, prepared)
    same_settings = _without_subset(identity)
    if head_file is not None:
        # Its subset and seed are the file's own; everything else must be today's (every difference is named).
        return FittedModel.load(head_file, expect=same_settings), Path(head_file)
    exact = head_path(paths, request, identity)
    if exact.is_file():
        return FittedModel.load(exact, expect=identity), exact
    heads = _saved_heads(paths)
    others = [path for path, meta in heads if not _differences(meta, same_settings)]
    if len(others) == 1:
        log.info("no head for %s seed %d with today's settings; using the one head trained with them: %s",
                 request.subset, request.seed, others[0].name)
        return FittedModel.load(others[0], expect=same_settings), others[0]
    if not heads:
        raise HeadNotFoundError(f"no trained head for {prepared.name!r} in {paths.models_dir}: run `medfocus train "
                                f"--dataset {prepared.name}` first")
    listing = []
    for path, meta in heads:
        differences = _differences(meta, identity)
        listing.append(f"  {path.name}: " + ("; ".join(differences[:3]) + (" …" if len(differences) > 3 else "")
                                             if differences else "matches"))
    raise HeadNotFoundError(
        f"no head trained with today's settings ({request.method}/{request.mode}, {request.subset}, seed {request.seed}) "
        f"among the {len(heads)} in {paths.models_dir}:\n" + "\n".join(listing) +
        "\npick one with --head FILE (it must match today's feature store and trainer settings), choose the subset with "
        "--fraction/--shots/--seed, or run `medfocus train` with today's settings"
    )
