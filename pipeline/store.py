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
