"""Shared fixtures: tests force CPU, one torch thread, and make their own small data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: the commands the tests start (dvc, medfocus) get one thread too.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


def requires_shared(*parts: str) -> Path:
    """The path under ../shared/datasets, or skip the test saying what is missing."""
    path = SHARED_DATASETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it lives in ../shared/datasets beside the checkout)")
    return path


def write_image(path: Path, seed: int, size: int = 48, mode: str = "RGB") -> Path:
    """A small random image with a bright square whose place depends on the seed, saved with PIL."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    corner = int(rng.integers(0, size // 2))
    array[corner : corner + size // 4, corner : corner + size // 4] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path)
    return path


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    """root/<class>/*.png: three classes of six distinct images each."""
    root = tmp_path / "data"
    for class_index, name in enumerate(["alpha", "beta", "gamma"]):
        for i in range(6):
            write_image(root / name / f"{name}_{i}.png", seed=class_index * 100 + i)
    return root


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (restored after): model tests share the machine's cores with other workers."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
