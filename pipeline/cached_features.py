"""Cached features read back: every image of a dataset from one feature store, as the trainer's tensors, with the
store's identity (what a trained head must match) and the training subsets prepare chose."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from medfocus.pipeline.manifest import DatasetError
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.preparation import PreparedDataset
from medfocus.pipeline.store import ImageStore
from medfocus.trainer import ClassText, FeatureSet

log = logging.getLogger(__name__)


class FeaturesMissingError(FileNotFoundError):
    """No feature store for the requested mode and the current feature settings."""


@dataclass
class CachedFeatures:
    """All images of a dataset from one feature store, with its identity (what a trained head must match)."""

    mode: str
    store_key: str
    weights_source: str
    encoder: dict
    features: FeatureSet
    text: ClassText
    splits: dict[str, list[int]]  # "train"/"test" -> row indices into features

    def rows(self, hashes: list[str]) -> list[int]:
        index = {h: i for i, h in enumerate(self.features.hashes)}
        missing = [h for h in hashes if h not in index]
        if missing:
            raise FeaturesMissingError(
                f"{len(missing)} image(s) of this subset have no features in store {self.store_key} "
                "(they failed in the segment or features stage; see segment.json / features.json)"
            )
        return [index[h] for h in hashes]

    def identity(self) -> dict:
        return feature_identity(self.store_key, self.mode, self.weights_source, self.encoder)


def feature_identity(store_key: str, mode: str, weights_source: str, encoder: dict) -> dict:
    """What a trained head must match: the feature store's key, its mode, weights and encoder."""
    return {"feature_store_key": store_key, "mode": mode, "weights_source": weights_source,
            "encoder_model": encoder.get("model")}


def store_identity(store: ImageStore) -> dict:
    """``feature_identity`` of an open feature store, from its attributes."""
    attrs = store.attrs
    return feature_identity(attrs["key"], attrs["spec"]["mode"], attrs["provenance"]["weights_source"], attrs["spec"]["encoder"])


def _class_text(store: ImageStore, class_names: list[str]) -> ClassText:
    if not store.has_shared("text"):
        return ClassText(class_names, None)
    embeddings, attrs = store.read_shared("text")
    if attrs["class_names"] != class_names:
        raise DatasetError(f"the feature store's classes {attrs['class_names']} differ from the dataset's {class_names}: rerun features")
    rows = [np.flatnonzero(np.asarray(attrs["class_index"]) == c) for c in range(len(class_names))]
    templates = max(len(r) for r in rows)
    # Classes with fewer prompts repeat theirs cyclically, so every class has the same T and the same weight per prompt set.
    stacked = np.stack([embeddings[np.resize(r, templates)] for r in rows])
    return ClassText(class_names, torch.from_numpy(stacked))


ROI_VIEW_ARRAY = "roi_global"  # per-image array of the ROI view's embedding, in stores of mode "dual"


def load_cached_features(prepared: PreparedDataset, store: ImageStore, only: set[str] | None = None) -> CachedFeatures:
    """Every manifest image that has features in ``store`` (failed images are left out and logged), or of those only
    the images whose hash is in ``only``. The ROI view (``roi_global``) is read when the store holds it."""
    class_index = {name: i for i, name in enumerate(prepared.class_names)}
    done = store.done([e.hash for e in prepared.entries])
    entries = [e for e in prepared.entries if e.hash in done]
    if len(entries) < len(prepared.entries):
        log.warning("%d image(s) of %s have no features in %s and are left out", len(prepared.entries) - len(entries), prepared.name, store.url)
    if only is not None:
        entries = [e for e in entries if e.hash in only]
    if not entries:
        raise FeaturesMissingError(f"the feature store {store.url} holds no image of {prepared.name}: run `medfocus features`")
    columns: dict[str, list[np.ndarray]] = {"global": [], "patches": [], "roi_weights": []}
    first, _ = store.read_image(entries[0].hash)
    if ROI_VIEW_ARRAY in first:
        columns[ROI_VIEW_ARRAY] = []
    for entry in entries:
        arrays, _ = store.read_image(entry.hash, tuple(columns))
        for name in columns:
            columns[name].append(arrays[name])

    def stacked(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack(columns[name]).astype(np.float32))

    features = FeatureSet(
        global_emb=stacked("global"),
        patch_tokens=stacked("patches"),
        roi_weights=stacked("roi_weights"),
        labels=torch.tensor([class_index[e.label] for e in entries]),
        hashes=[e.hash for e in entries],
        roi_global=stacked(ROI_VIEW_ARRAY) if ROI_VIEW_ARRAY in columns else None,
    )
    attrs = store.attrs
    splits = {split: [i for i, e in enumerate(entries) if e.split == split] for split in ("train", "test")}
    return CachedFeatures(attrs["spec"]["mode"], attrs["key"], attrs["provenance"]["weights_source"], attrs["spec"]["encoder"],
                          features, _class_text(store, prepared.class_names), splits)


def load_image_features(store: ImageStore, hashes: list[str], labels: list[int]) -> FeatureSet:
    """The features of the images ``hashes`` (all done in ``store``) as a FeatureSet with the given labels: how
    evaluate reads an external test set, whose labels are its own classes (pipeline.external), from the training
    dataset's store."""
    columns: dict[str, list[np.ndarray]] = {"global": [], "patches": [], "roi_weights": []}
    first, _ = store.read_image(hashes[0])
    if ROI_VIEW_ARRAY in first:
        columns[ROI_VIEW_ARRAY] = []
    for digest in hashes:
        arrays, _ = store.read_image(digest, tuple(columns))
        for name in columns:
            columns[name].append(arrays[name])

    def stacked(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack(columns[name]).astype(np.float32))

    return FeatureSet(global_emb=stacked("global"), patch_tokens=stacked("patches"), roi_weights=stacked("roi_weights"),
                      labels=torch.tensor(labels), hashes=list(hashes),
                      roi_global=stacked(ROI_VIEW_ARRAY) if ROI_VIEW_ARRAY in columns else None)


def subset_hashes(paths: DatasetPaths, fraction: float | None, shots: int | None, seed: int) -> list[str]:
    subsets = read_json(paths.splits)
    kind, value = ("shots", str(shots)) if shots is not None else ("fraction", f"{fraction:g}")
    try:
        return subsets[kind][value][str(seed)]
    except KeyError:
        available = {k: sorted(v) for k, v in subsets.items()}
        raise DatasetError(
            f"no training subset {kind}={value} seed={seed}; prepared subsets: {available} (change prepare.fractions/shots/subset_seeds)"
        ) from None
