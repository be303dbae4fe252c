"""Meta's SAM 2.1 (``sam2`` package) as a segmenter, in two modes over the same model.

* ``auto``: the paper's setting, ``SAM2AutomaticMaskGenerator`` over a points_per_side² grid at the model's
  1024² input. Every mask the generator returns is kept as a candidate; the ROI policy picks one of them.
  On a CPU this costs minutes per image (one decoder pass per grid point).
* ``prompted``: the fast ROI mode. The image encoder runs once, then the ROI policy decodes a handful of box
  prompts (the same policy code as the LiteMedSAM backend). ``image_size`` may be lowered (a multiple of 32)
  to run the same weights on a smaller input.

Weights: ``checkpoint`` is a local ``sam2.1_hiera_*.pt`` path, or ``"auto"`` to fetch it with
``huggingface_hub.hf_hub_download`` into the standard Hugging Face cache (an offline site pre-seeds that cache
with ``huggingface-cli download <hf id> <file>`` and sets ``HF_HUB_OFFLINE=1``). ``pretrained=False`` or, when
the weights cannot be had, ``allow_random_init=True`` builds a randomly initialised model (torch seed 0) for
tests and timings only; ``describe()`` then says ``"random-init"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfocus.pipeline.images import file_sha256
from medfocus.pipeline.medsam_lite_identity import WeightsUnavailableError
from medfocus.pipeline.provenance import RANDOM_INIT_SEED, seeded_construction
from medfocus.pipeline.segmenters.base import (
    WORK_SIZE,
    Candidate,
    SegmentationResult,
    assemble_result,
    check_image,
    resize_logits,
)
from medfocus.pipeline.segmenters import selection
from medfocus.pipeline.segmenters.embedding_map import check_map_segmenter
from medfocus.pipeline.segmenters.policies import RoiPolicy, get_policy
from medfocus.pipeline.segmenters.selection import grayscale_work_image

logger = logging.getLogger(__name__)

# Model size -> Hugging Face id; config and checkpoint file names come from sam2's own table.
SAM2_HF_IDS = {
    "tiny": "facebook/sam2.1-hiera-tiny",
    "small": "facebook/sam2.1-hiera-small",
    "base_plus": "facebook/sam2.1-hiera-base-plus",
    "large": "facebook/sam2.1-hiera-large",
}
NATIVE_IMAGE_SIZE = 1024
MODES = ("auto", "prompted")


def sam2_files(model_size: str) -> tuple[str, str, str]:
    """(Hugging Face id, hydra config name, checkpoint file name) of a SAM 2.1 model size."""
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    if model_size not in SAM2_HF_IDS:
        raise ValueError(f"unknown SAM2 model size {model_size!r}; choose one of {sorted(SAM2_HF_IDS)}")
    hf_id = SAM2_HF_IDS[model_size]
    config_name, checkpoint_name = HF_MODEL_ID_TO_FILENAMES[hf_id]
    return hf_id, config_name, checkpoint_name


def missing_weights_message(model_size: str, reason: str) -> str:
    hf_id, _, checkpoint_name = sam2_files(model_size)
    return (
        f"SAM2 {model_size} weights are not available ({reason}). Provide one of: "
        f"checkpoint=/path/to/{checkpoint_name} (segment option 'checkpoint'); or pre-seed the Hugging Face cache "
        f"on a connected machine with `huggingface-cli download {hf_id} {checkpoint_name}` and run with "
        f"checkpoint=auto (HF_HUB_OFFLINE=1 on an air-gapped site). allow_random_init=True builds an untrained "
        f"model, for tests and timings only."
    )


def resolve_sam2_checkpoint(model_size: str, checkpoint: str) -> str:
    """A local checkpoint path for ``checkpoint`` ("auto" or a path), or WeightsUnavailableError saying what to provide."""
    hf_id, _, checkpoint_name = sam2_files(model_size)
    if checkpoint != "auto":
        if not Path(checkpoint).is_file():
            raise WeightsUnavailableError(missing_weights_message(model_size, f"no file at {checkpoint}"))
        return str(checkpoint)
    from huggingface_hub import hf_hub_download

    from medfocus.pipeline.hub import offline_unless_hub_reachable

    offline_unless_hub_reachable()
    try:
        return hf_hub_download(repo_id=hf_id, filename=checkpoint_name)
    except Exception as error:  # offline, missing cache entry, bad token: all mean "no weights here"
        reason = f"hf_hub_download({hf_id!r}, {checkpoint_name!r}) failed: {type(error).__name__}"
        raise WeightsUnavailableError(missing_weights_message(model_size, reason)) from error


def build_sam2_model(
    model_size: str, checkpoint_path: str | None, image_size: int, device: str
) -> torch.nn.Module:
    """SAM2Base from sam2's hydra config; random init (seeded) when checkpoint_path is None."""
    from sam2.build_sam import build_sam2

    _, config_name, _ = sam2_files(model_size)
    overrides = [] if image_size == NATIVE_IMAGE_SIZE else [f"++model.image_size={image_size}"]
    with seeded_construction():
        return build_sam2(config_name, ckpt_path=checkpoint_path, device=device, hydra_overrides_extra=overrides)


@dataclass
class Sam2Embedding:
    """One encoded image; decodes box prompts into work-frame logits."""

    model: torch.nn.Module
    image_embed: torch.Tensor  # (1, 256, s/16, s/16)
    high_res_features: list[torch.Tensor]  # (1, 32, s/4, s/4), (1, 64, s/8, s/8)

    @torch.inference_mode()
    def decode_boxes(self, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Box prompts (N, 4) as xyxy fractions -> logits (N, 4, WORK_SIZE, WORK_SIZE), predicted IoU (N, 4).

        All four mask tokens come back (0: single-mask output, 1-3: multimask outputs), as SAM2's decoder
        computes them all on every call.
        """
        size = self.model.image_size
        corners = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 2, 2) * size
        corners = corners.to(self.image_embed.device)
        corner_labels = torch.tensor([[2, 3]], dtype=torch.int, device=corners.device).repeat(len(corners), 1)
        sparse, dense = self.model.sam_prompt_encoder(points=(corners, corner_labels), boxes=None, masks=None)
        logits, iou, _, _ = self.model.sam_mask_decoder.predict_masks(
            image_embeddings=self.image_embed,
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            repeat_image=len(corners) > 1,
            high_res_features=self.high_res_features,
        )
        return resize_logits(logits.float().cpu(), WORK_SIZE), iou.float().cpu()


class Sam2Segmenter:
    backend = "sam2"

    def __init__(
        self,
        *,
        policy: str | RoiPolicy,
        store_resolution: int = 256,
        device: str = "cpu",
        allow_random_init: bool = False,
        pretrained: bool = True,
        model_size: str = "tiny",
        checkpoint: str = "auto",
        mode: str = "prompted",
        image_size: int = NATIVE_IMAGE_SIZE,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown sam2 mode {mode!r}; choose one of {MODES}")
        if image_size % 32 != 0 or image_size <= 0:
            raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
        if mode == "auto" and image_size != NATIVE_IMAGE_SIZE:
            raise ValueError(f"mode 'auto' runs the generator at the model's {NATIVE_IMAGE_SIZE}² input only")
        if not pretrained and not allow_random_init:
            raise ValueError("sam2 with pretrained=False needs allow_random_init=True (random-init is for tests)")
        self.policy = get_policy(policy)  # a name, a policy file, or a policy description (the spec's)
        check_map_segmenter(self.policy, self.backend, "")
        self.store_resolution = int(store_resolution)
        self.device = device
        self.model_size = model_size
        self.mode = mode
        self.image_size = int(image_size)
        self.generator_options = {
            "points_per_side": int(points_per_side),
            "points_per_batch": int(points_per_batch),
            "pred_iou_thresh": float(pred_iou_thresh),
            "stability_score_thresh": float(stability_score_thresh),
            "box_nms_thresh": float(box_nms_thresh),
        }
        self.hf_id, self.config_name, self.checkpoint_name = sam2_files(model_size)
        checkpoint_path = None
        if pretrained:
            try:
                checkpoint_path = resolve_sam2_checkpoint(model_size, checkpoint)
            except WeightsUnavailableError as error:
                if not allow_random_init:
                    raise
                logger.warning("%s -- building random-init SAM2 because allow_random_init=True", error)
        self.checkpoint = file_sha256(checkpoint_path) if checkpoint_path else "random-init"
        self.model = build_sam2_model(model_size, checkpoint_path, self.image_size, device)
        from sam2.utils.transforms import SAM2Transforms

        self._transforms = SAM2Transforms(resolution=self.image_size, mask_threshold=0.0)
        self._generator = None
        if mode == "auto":
            from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

            self._generator = SAM2AutomaticMaskGenerator(self.model, **self.generator_options)

    def describe(self) -> dict:
        description = {
            "backend": self.backend,
            "model": f"SAM 2.1 hiera {self.model_size}",
            "hf_id": self.hf_id,
            "config": self.config_name,
            "checkpoint_sha256": self.checkpoint,
            "mode": self.mode,
            "image_size": self.image_size,
            "store_resolution": self.store_resolution,
            "policy": self.policy.describe(),
        }
        if self.checkpoint == "random-init":
            description["random_init_seed"] = RANDOM_INIT_SEED
        if self.mode == "auto":
            description["generator"] = dict(self.generator_options)
        return description

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> Sam2Embedding:
        image = check_image(image)
        pixels = self._transforms(np.array(image))[None].to(self.device)  # a writable copy for ToTensor
        backbone_out = self.model.forward_image(pixels)
        _, vision_feats, _, feat_sizes = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        features = [
            feat.permute(1, 2, 0).reshape(1, -1, *size) for feat, size in zip(vision_feats, feat_sizes)
        ]
        return Sam2Embedding(model=self.model, image_embed=features[-1], high_res_features=features[:-1])

    def generator_candidates(self, image: np.ndarray) -> list[Candidate]:
        """Every mask of the automatic mask generator, as work-frame candidates."""
        records = self._generator.generate(np.array(check_image(image)))  # a writable copy for ToTensor
        candidates = []
        for record in records:
            binary = torch.from_numpy(record["segmentation"]).float()
            x, y = record["point_coords"][0]
            candidates.append(
                Candidate(
                    logits=resize_logits(binary * 2 - 1, WORK_SIZE),
                    score=float(record["predicted_iou"]),
                    stability=float(record["stability_score"]),
                    source=f"amg point ({x / image.shape[1]:.3f}, {y / image.shape[0]:.3f})",
                )
            )
        return candidates

    def segment(self, image: np.ndarray) -> SegmentationResult:
        gray = grayscale_work_image(check_image(image))
        if self.mode == "auto":
            ranked, roi_index = selection.choose(self.policy, self.generator_candidates(image), gray)
            return assemble_result(ranked, roi_index, self.store_resolution)
        return selection.run(self.policy, gray, self.embed(image), self.store_resolution)
