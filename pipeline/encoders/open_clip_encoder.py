"""open_clip image encoders with patch tokens and in-transformer ROI attention steering.

Two vision towers are run block by block, so that the attention bias reaches exactly the chosen layers:

* open_clip's own ``VisionTransformer`` (ViT-B-32, ViT-B-16, ...), whether its blocks use ``nn.MultiheadAttention``
  or open_clip's ``Attention``; patch tokens go through ``ln_post`` and ``proj`` like the CLS token does.
* a timm ``VisionTransformer`` trunk (BiomedCLIP, SigLIP, ...); patch tokens go through the trunk's token-wise head
  and open_clip's projection. With an attention-pool head (``map``, SigLIP) the global embedding comes from that
  pool and the tokens stay in the trunk's space (``describe()["patch_tokens"]`` says so).

Other towers (ResNets, CoCa's attentional pooler, ...) have no patch tokens in the image-embedding space and are
refused with :class:`UnsupportedEncoderFeature`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import nn

from .base import UnsupportedEncoderFeature, common_description, letterbox, to_normalised_tensor
from .steering import canonical_layers

_RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def _key_bias_mask(patch_bias: torch.Tensor, prefix_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) patch-key bias -> (B, 1, 1, T) additive logit mask; prefix (CLS) keys stay unbiased."""
    prefix = patch_bias.new_zeros(patch_bias.shape[0], prefix_tokens)
    return torch.cat([prefix, patch_bias], dim=1).to(dtype)[:, None, None, :]


class OpenClipTower:
    """open_clip's VisionTransformer, run block by block."""

    patch_tokens = "ln_post + proj (same space as the global embedding)"

    def __init__(self, visual: VisionTransformer):
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise UnsupportedEncoderFeature(
                "this open_clip ViT pools with an attentional pooler (CoCa-style) or not at all: its outputs are "
                "not patch tokens, so it can't serve as a patch-token encoder"
            )
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        self.num_heads = self.blocks[0].attn.num_heads
        self.prefix_tokens = 1
        self.grid = tuple(int(size) for size in visual.grid_size)
        self.width = int(visual.transformer.width)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(visual.patch_dropout(x))

    def run_blocks(self, x: torch.Tensor, key_mask: torch.Tensor | None, layers: frozenset[int]) -> torch.Tensor:
        mask = None
        if key_mask is not None:
            batch, tokens = x.shape[0], x.shape[1]
            # nn.MultiheadAttention wants a (B * heads, T, T) float mask; open_clip's Attention reshapes that to
            # (B, heads, T, T). The same bias goes to every head and every query row. Built once per batch.
            mask = key_mask.expand(batch, self.num_heads, tokens, tokens).reshape(batch * self.num_heads, tokens, tokens)
        batch_first = self.visual.transformer.batch_first
        if not batch_first:
            x = x.transpose(0, 1)
        for index, block in enumerate(self.blocks):
            x = block(x, attn_mask=mask if index in layers else None)
        return x if batch_first else x.transpose(0, 1)

    def finish(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.visual
        if visual.final_ln_after_pool:
            pooled = x[:, 0] if visual.pool_type == "tok" else x[:, 1:].mean(dim=1)
            pooled = visual.ln_post(pooled)
            tokens = visual.ln_post(x[:, 1:])
        else:
            x = visual.ln_post(x)
            pooled = x[:, 0] if visual.pool_type == "tok" else x[:, 1:].mean(dim=1)
            tokens = x[:, 1:]
        if visual.proj is not None:
            pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
        return pooled, tokens


class TimmVitTower:
    """A timm VisionTransformer trunk inside open_clip's TimmModel, run block by block."""

    def __init__(self, visual: nn.Module):
        from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

        trunk = getattr(visual, "trunk", None)
        if not isinstance(trunk, TimmVisionTransformer):
            raise UnsupportedEncoderFeature(
                f"the image tower {type(trunk or visual).__name__} is not a ViT: it has no patch tokens to give or "
                f"to steer (supported: open_clip ViTs and timm VisionTransformer trunks)"
            )
        if any(name == "pool" for name, _ in visual.head.named_children()):
            raise UnsupportedEncoderFeature("this timm tower pools with an attention pool in open_clip's head")
        self.visual = visual
        self.trunk = trunk
        self.blocks = trunk.blocks
        self.num_heads = self.blocks[0].attn.num_heads
        self.prefix_tokens = int(trunk.num_prefix_tokens)
        self.grid = tuple(int(size) for size in trunk.patch_embed.grid_size)
        self.width = int(trunk.embed_dim)
        self.tokens_in_embedding_space = trunk.global_pool != "map"
        self.patch_tokens = (
            "trunk norm + head + open_clip projection (same space as the global embedding)"
            if self.tokens_in_embedding_space
            else "trunk norm + head + open_clip projection; the global embedding comes from an attention-pool "
                 "head, so the tokens are not in its space"
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk
        x = trunk.patch_embed(images)
        x = trunk._pos_embed(x)  # timm's own position/prefix-token step, kept so every timm ViT variant is right
        x = trunk.patch_drop(x)
        return trunk.norm_pre(x)

    def run_blocks(self, x: torch.Tensor, key_mask: torch.Tensor | None, layers: frozenset[int]) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            # timm's attention takes any mask broadcastable to (B, heads, T, T).
            x = block(x, attn_mask=key_mask if index in layers else None)
        return x

    def finish(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self.trunk
        x = trunk.norm(x)
        pooled = self.visual.head(trunk.forward_head(x))
        tokens = self.visual.head(trunk.head(trunk.fc_norm(x[:, self.prefix_tokens:])))
        return pooled, tokens


def embedding_dim(tower: OpenClipTower | TimmVitTower) -> int:
    """D of the tower's outputs, read off a dry run of its final norm and projection on zero tokens."""
    tokens = tower.prefix_tokens + tower.grid[0] * tower.grid[1]
    parameter = next(tower.blocks.parameters())
    with torch.no_grad():
        pooled, patch_tokens = tower.finish(parameter.new_zeros(1, tokens, tower.width))
    if pooled.shape[-1] != patch_tokens.shape[-1]:
        raise UnsupportedEncoderFeature(
            f"the patch tokens ({patch_tokens.shape[-1]}-d) can't be put in the global embedding's space "
            f"({pooled.shape[-1]}-d) for this tower"
        )
    return int(pooled.shape[-1])


def vision_tower(visual: nn.Module) -> OpenClipTower | TimmVitTower:
    if isinstance(visual, VisionTransformer):
        return OpenClipTower(visual)
    return TimmVitTower(visual)


def resolve_layers(layers: str | list[int], depth: int) -> list[int]:
    """``"all"`` or block indices (negative ones count from the end) -> sorted indices in ``range(depth)``."""
    if layers == "all":
        return list(range(depth))
    resolved = set()
    for index in layers:
        if not -depth <= index < depth:
            raise ValueError(f"attention layer {index} is out of range for a {depth}-block transformer")
        resolved.add(index % depth)
    return sorted(resolved)


class OpenClipEncoder:
    """An open_clip model as an :class:`ImageEncoder`."""

    family = "open_clip"
    has_text = True
    placement = "centre"  # letterbox centres the image in its square input (patch_grid.roi_patch_weights)

    def __init__(
        self,
        model: nn.Module,
        *,
        model_name: str,
        pretrained: str,
        weights_source: str,
        weights_sha256: str,
        tokenizer: Callable[[], Callable[[list[str]], torch.Tensor]],
        attention_layers: str | list[int] = "all",
        device: str = "cpu",
    ):
        self.model = model.to(device).eval()
        self.model_name = model_name
        self.pretrained = pretrained
        self.weights_source = weights_source
        self.weights_sha256 = weights_sha256
        self.device = torch.device(device)
        self._tokenizer_factory = tokenizer
        self._tokenizer: Callable[[list[str]], torch.Tensor] | None = None
        self.tower = vision_tower(model.visual)
        self.grid = self.tower.grid
        # Models built by open_clip.create_model carry their preprocessing config; others get open_clip's defaults.
        cfg = {**asdict(PreprocessCfg()), **open_clip.get_model_preprocess_cfg(model)}
        image_size = cfg["size"]
        sizes = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if sizes[0] != sizes[1]:
            raise UnsupportedEncoderFeature(f"{model_name} takes non-square {sizes} inputs; only square ones are handled")
        self.image_size = int(sizes[0])
        self.embed_dim = embedding_dim(self.tower)
        self.mean = tuple(float(value) for value in cfg["mean"])
        self.std = tuple(float(value) for value in cfg["std"])
        self.interpolation = str(cfg["interpolation"])
        if self.interpolation not in _RESAMPLING:
            raise ValueError(f"unknown preprocessing interpolation {self.interpolation!r} for {model_name}")
        self.attention_layers = resolve_layers(canonical_layers(attention_layers), len(self.tower.blocks))
        self._attention_layer_set = frozenset(self.attention_layers)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def describe(self) -> dict[str, Any]:
        return {
            **common_description(self),
            "model": self.model_name,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "preprocess": {
                "resize": "letterbox",
                "interpolation": self.interpolation,
                "mean": list(self.mean),
                "std": list(self.std),
            },
            "patch_tokens": self.tower.patch_tokens,
            "open_clip_version": open_clip.__version__,
        }

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        square = letterbox(image, self.image_size, _RESAMPLING[self.interpolation])
        return to_normalised_tensor(square, self.mean, self.std)

    @torch.no_grad()
    def encode_images(
        self, batch: torch.Tensor, patch_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = batch.to(self.device, dtype=next(self.model.parameters()).dtype)
        x = self.tower.embed(batch)
        key_mask = None
        if patch_bias is not None:
            patch_bias = torch.as_tensor(patch_bias, device=self.device)
            expected = (batch.shape[0], self.num_patches)
            if tuple(patch_bias.shape) != expected:
                raise ValueError(f"patch_bias must have shape {expected}, got {tuple(patch_bias.shape)}")
            key_mask = _key_bias_mask(patch_bias, self.tower.prefix_tokens, x.dtype)
        x = self.tower.run_blocks(x, key_mask, self._attention_layer_set)
        return self.tower.finish(x)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            self._tokenizer = self._tokenizer_factory()
        tokens = self._tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True)
