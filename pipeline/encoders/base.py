"""What every image encoder offers the feature stage, and the pieces the implementations share."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from medfocus.pipeline.images import file_sha256  # noqa: F401  (one sha256 helper; factory and weights use it from here)
from medfocus.pipeline.provenance import RANDOM_INIT, RANDOM_INIT_SEED, seeded_construction  # noqa: F401  (re-exported)


class PretrainedWeightsUnavailable(RuntimeError):
    """The requested pretrained weights cannot be had here (no network, no cache, no file)."""


class UnsupportedEncoderFeature(RuntimeError):
    """The encoder's architecture can't do what was asked (attention steering, text prompts, patch tokens)."""


@runtime_checkable
class ImageEncoder(Protocol):
    """A frozen image encoder that gives a global embedding and patch tokens in one space.

    Attributes: ``weights_source`` ("pretrained:<spec>" or "random-init"), ``image_size`` (square input side),
    ``grid`` (patch grid (gh, gw), L = gh * gw), ``embed_dim`` (D of both outputs), ``has_text``, ``placement``.
    """

    weights_source: str
    image_size: int
    grid: tuple[int, int]
    embed_dim: int
    has_text: bool
    placement: str  # where preprocess puts the image in the square input: "centre" or "top-left"

    def describe(self) -> dict:
        """JSON-able identity of the encoder: family, model, pretrained spec, weights source and sha256, sizes."""

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, S, S) float32, letterboxed and normalised the model's way."""

    def encode_images(
        self, batch: torch.Tensor, patch_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> global (B, D) and patch tokens (B, L, D), unnormalised.

        ``patch_bias`` (B, L) is added to the attention logits of the patch keys inside the transformer.
        """

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings; raises :class:`UnsupportedEncoderFeature` without a text tower."""


def common_description(encoder) -> dict:
    """What every encoder's ``describe()`` starts with: family, weights and sizes."""
    return {
        "family": encoder.family,
        "pretrained": encoder.pretrained,
        "weights_source": encoder.weights_source,
        "weights_sha256": encoder.weights_sha256,
        "random_init_seed": RANDOM_INIT_SEED if encoder.weights_source == RANDOM_INIT else None,
        "image_size": encoder.image_size,
        "embed_dim": encoder.embed_dim,
        "grid": list(encoder.grid),
        "num_patches": encoder.grid[0] * encoder.grid[1],
    }


def letterbox(image: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """Resize ``image`` so that its longer side is ``size`` and centre it on a black ``size`` x ``size`` square.

    Unlike CLIP's resize-and-centre-crop this keeps every pixel (lesions near an edge stay in view) and the
    aspect ratio; black is the background of the modalities we handle.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_height, new_width) != (height, width):
        image = np.array(Image.fromarray(image).resize((new_width, new_height), resample=resample))
    if new_height == new_width == size:
        return image
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    canvas[top:top + new_height, left:left + new_width] = image
    return canvas


def to_normalised_tensor(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(S, S, 3) uint8 -> (3, S, S) float32 ``(x / 255 - mean) / std``."""
    tensor = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1).div_(255.0)  # a copy: inputs may be read-only
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


