"""Zarr v3 stores of per-image results, found by content hash, safe to kill and resume.

Layout of one store (``<key>.zarr``, the key hashing everything that determines its content)::

    zarr.json                 root attributes: key, spec (every setting), provenance (weights, versions)
    images/<sha256>/...       one group per image: its arrays, attributes written LAST with complete=True
    shared/...                arrays computed once per store (e.g. class text embeddings)

An image counts as done only when its group's attributes say ``complete``; a write that was killed half-way leaves a
group without that flag, which is neither read nor skipped, and is overwritten by the next run. Every key is written
atomically by the store (local files: temp + rename; object stores: one PUT), so the flag is never half-written.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

COMPRESSORS = (BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"),)


class StoreMismatchError(ValueError):
    """A store exists at this location but was made with other settings."""


class IncompleteImageError(KeyError):
    """The image is not (completely) in the store."""


def canonical_json(spec: Any) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)


def store_key(spec: dict, length: int = 16) -> str:
    """A short, stable hash of every setting that determines a store's content."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:length]


class ImageStore:
    def __init__(self, url: str, *, read_only: bool = False, storage_options: dict | None = None):
        self.url = url
        mode = "r" if read_only else "a"
        try:
            self.root = zarr.open_group(store=url, mode=mode, zarr_format=3, storage_options=storage_options)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"no Zarr store at {url}") from error
        self.read_only = read_only

    @classmethod
    def create_or_open(cls, url: str, key: str, spec: dict, provenance: dict, storage_options: dict | None = None) -> "ImageStore":
        """Open the store for ``key``, creating it with its spec and provenance; refuse a store made for another key."""
        store = cls(url, storage_options=storage_options)
        existing = dict(store.root.attrs)
        if existing:
            if existing.get("key") != key:
                raise StoreMismatchError(
                    f"{url} holds a store with key {existing.get('key')!r}, not {key!r}: it was made with other settings; "
                    "move it away or choose another store location"
                )
        else:
            store.root.update_attributes({"key": key, "spec": json.loads(canonical_json(spec)), "provenance": provenance})
        store.root.require_group("images")
        return store

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    @property
    def key(self) -> str:
        return self.attrs["key"]

    def _image_group(self, digest: str):
        return zarr.open_group(store=self.root.store, path=f"{self.root.path}/images/{digest}".lstrip("/"), mode="r")

    def is_done(self, digest: str) -> bool:
        try:
            return bool(self._image_group(digest).attrs.get("complete"))
        except Exception:  # missing or unreadable metadata both mean: not done
            return False

    def done(self, digests: list[str]) -> set[str]:
        return {d for d in digests if self.is_done(d)}

    def write_image(self, digest: str, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> None:
        """Write one image's arrays, then mark it complete. Overwrites any half-written earlier attempt."""
        images = self.root.require_group("images")
        group = images.create_group(digest, overwrite=True)
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            group.create_array(name, data=array, chunks=array.shape or (1,), compressors=COMPRESSORS)
        group.update_attributes({**json.loads(canonical_json(attrs or {})), "complete": True})

    def read_image(self, digest: str, names: tuple[str, ...] | None = None) -> tuple[dict[str, np.ndarray], dict]:
        try:
            group = self._image_group(digest)
        except Exception as error:
            raise IncompleteImageError(f"image {digest[:12]}… is not in {self.url}") from error
        attrs = dict(group.attrs)
        if not attrs.get("complete"):
            raise IncompleteImageError(f"image {digest[:12]}… in {self.url} is incomplete (an interrupted write); rerun the stage")
        wanted = names if names is not None else tuple(group.array_keys())
        return {name: group[name][...] for name in wanted}, attrs

    def write_shared(self, name: str, array: np.ndarray, attrs: dict | None = None) -> None:
        shared = self.root.require_group("shared")
        array = np.ascontiguousarray(array)
        shared.create_array(name, data=array, chunks=array.shape, compressors=COMPRESSORS, overwrite=True,
                            attributes=json.loads(canonical_json(attrs or {})))

    def read_shared(self, name: str) -> tuple[np.ndarray, dict]:
        array = self.root["shared"][name]
        return array[...], dict(array.attrs)

    def has_shared(self, name: str) -> bool:
        try:
            return name in self.root["shared"].array_keys()
        except KeyError:
            return False


class StoreMissingError(FileNotFoundError):
    """The store that today's settings call for has not been made yet; the message names the command that makes it."""


def _open_existing(cls, url: str, key: str, missing: str):
    try:
        store = cls(url, read_only=True)
    except FileNotFoundError:
        raise StoreMissingError(missing) from None
    if store.attrs.get("key") != key:
        raise StoreMismatchError(f"{url} holds a store with key {store.attrs.get('key')!r}, not {key!r}")
    return store


# Per-image arrays of a mask store, and the LiteMedSAM embedding summary kept beside them (see medsam_lite).
MASK_ARRAYS = ("labels", "roi")
EMBEDDING_ARRAYS = ("global", "patches", "roi_weights", "roi_global")
EMBEDDING_PREFIX = "embedding_"


class MaskStore(ImageStore):
    """The segment stage's store: per image the label map, the ROI and (LiteMedSAM) the pooled image embedding."""

    kind = "masks"

    @classmethod
    def create(cls, url: str, key: str, spec: dict, provenance: dict) -> "MaskStore":
        base = ImageStore.create_or_open(url, key, spec, provenance)
        return cls(base.url)

    @classmethod
    def lookup(cls, url: str, key: str, dataset: str) -> "MaskStore":
        return _open_existing(cls, url, key, f"no masks for {dataset!r} with today's segment settings yet: run "
                                             f"`medfocus segment --dataset {dataset}` first")

    def write(self, digest: str, labels: np.ndarray, roi: np.ndarray, attrs: dict,
              embedding: dict[str, np.ndarray] | None = None) -> None:
        arrays = {"labels": labels.astype(np.uint16), "roi": roi.astype(bool)}
        for name, array in (embedding or {}).items():
            arrays[EMBEDDING_PREFIX + name] = np.asarray(array, dtype=np.float32)
        self.write_image(digest, arrays, attrs)

    def read_masks(self, digest: str) -> tuple[np.ndarray, np.ndarray]:
        """An image's ROI and label map, or an error saying why there are none."""
        try:
            arrays, _ = self.read_image(digest, MASK_ARRAYS)
        except IncompleteImageError:
            raise IncompleteImageError(
                f"no masks for this image in {self.url}: its segmentation failed or was interrupted (see segment.json); "
                "rerun `medfocus segment`"
            ) from None
        return arrays["roi"], arrays["labels"]

    def read_embedding(self, digest: str) -> dict[str, np.ndarray]:
        """The image's pooled embedding (global, patches, roi_weights, roi_global), stored by a LiteMedSAM segmenter."""
        try:
            arrays, _ = self.read_image(digest, tuple(EMBEDDING_PREFIX + name for name in EMBEDDING_ARRAYS))
        except IncompleteImageError:
            raise IncompleteImageError(
                f"no embedding for this image in {self.url}: its segmentation failed or was interrupted (see "
                "segment.json); rerun `medfocus segment`"
            ) from None
        return {name: arrays[EMBEDDING_PREFIX + name] for name in EMBEDDING_ARRAYS}


FEATURE_ARRAYS = ("global", "patches", "roi_weights")
TEXT = "text"


class FeatureStore(ImageStore):
    """One ROI mode's feature store: per image ``global``, ``patches``, ``roi_weights`` (and ``roi_global`` in mode
    ``dual``); once per store the class prompts' text embeddings, with the prompts they were made from."""

    kind = "features"

    @classmethod
    def create(cls, url: str, key: str, spec: dict, provenance: dict) -> "FeatureStore":
        base = ImageStore.create_or_open(url, key, spec, provenance)
        return cls(base.url)

    @classmethod
    def lookup(cls, url: str, key: str, dataset: str, mode: str) -> "FeatureStore":
        return _open_existing(cls, url, key, f"no {mode!r} features for {dataset!r} with today's settings yet: run "
                                             f"`medfocus features --dataset {dataset} --mode {mode}` first")

    @property
    def mode(self) -> str:
        return self.attrs["spec"]["mode"]

    def write_features(self, digest: str, arrays: dict[str, np.ndarray], dtype: np.dtype) -> None:
        stored = {name: np.asarray(array).astype(np.float32 if name == "roi_weights" else dtype)
                  for name, array in arrays.items()}
        self.write_image(digest, stored)

    def array_names(self) -> tuple[str, ...]:
        return FEATURE_ARRAYS + (("roi_global",) if self.mode == "dual" else ())

    def text_matches(self, text: dict | None) -> bool:
        """Whether the stored text embeddings were made from exactly these class names and prompts."""
        if text is None:
            return not self.has_shared(TEXT)
        return self.has_shared(TEXT) and self.read_shared(TEXT)[1].get("text") == json.loads(canonical_json(text))

    def write_text(self, text: dict, embeddings: np.ndarray, class_index: list[int], prompts: list[str]) -> None:
        self.write_shared(TEXT, embeddings, {"text": text, "prompts": prompts, "class_index": class_index,
                                             "class_names": text["class_names"]})
