"""Classification heads over cached features. Each maps :class:`HeadInputs` to class logits (N, C).

All heads are rebuilt from ``(architecture kwargs, state_dict)``, which is what a saved model holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import FeatureMismatchError, FeatureSet

MAX_LOGIT_SCALE = 100.0  # CLIP's cap on a learned logit scale


@dataclass
class HeadInputs:
    """Features in the form the heads use: L2-normalised embeddings, prepared once per fit, not per epoch."""

    image: Tensor  # (N, D) normalised global embeddings
    patches: Tensor | None  # (N, L, D_tokens) normalised patch tokens; None for heads that ignore them
    roi: Tensor | None  # (N, L)
    roi_view: Tensor | None = None  # (N, D) normalised ROI-view embeddings; None for heads that ignore them
    has_roi: Tensor | None = None  # (N,) bool: the image has an ROI at all (some roi weight > 0)

    @classmethod
    def from_features(cls, features: FeatureSet, with_patches: bool, with_roi_view: bool = False) -> "HeadInputs":
        image = F.normalize(features.global_emb, dim=-1)
        patches = F.normalize(features.patch_tokens, dim=-1) if with_patches else None
        roi = features.roi_weights if with_patches else None
        if not with_roi_view:
            return cls(image=image, patches=patches, roi=roi)
        if features.roi_global is None:
            raise FeatureMismatchError("these features have no ROI view (roi_global): they come from a store of another mode than 'dual'")
        return cls(image=image, patches=patches, roi=roi, roi_view=F.normalize(features.roi_global, dim=-1),
                   has_roi=features.roi_weights.amax(dim=1) > 0)

    def take(self, index: Tensor) -> "HeadInputs":
        def pick(value: Tensor | None) -> Tensor | None:
            return None if value is None else value[index]

        return HeadInputs(image=self.image[index], patches=pick(self.patches), roi=pick(self.roi),
                          roi_view=pick(self.roi_view), has_roi=pick(self.has_roi))

    def swap_views(self) -> "HeadInputs":
        """The ROI view in the place of the whole image, so a whole-image head can be trained on the ROI view."""
        if self.roi_view is None:
            raise FeatureMismatchError("no ROI view to swap in")
        return HeadInputs(image=self.roi_view, patches=None, roi=None)


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator) * std


class CosineClassifierHead(nn.Module):
    """Scaled cosine between the global image embedding and one embedding per class.

    Fixed (buffers) it is zero-shot CLIP; with ``trainable=True`` it is the few-shot CLIP line (class embeddings
    initialised from the prompts, then trained on the few shots).
    """

    uses_patches = False
    uses_roi_view = False

    def __init__(self, embed_dim: int, num_classes: int, logit_scale: float, trainable: bool, learn_logit_scale: bool = False):
        super().__init__()
        self.architecture = {
            "embed_dim": embed_dim, "num_classes": num_classes, "logit_scale": logit_scale,
            "trainable": trainable, "learn_logit_scale": learn_logit_scale,
        }
        self.class_embeddings = nn.Parameter(torch.zeros(num_classes, embed_dim), requires_grad=trainable)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)), requires_grad=trainable and learn_logit_scale)

    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, inputs: HeadInputs) -> Tensor:
        return self.logit_scale() * inputs.image @ F.normalize(self.class_embeddings, dim=-1).T


class LinearProbeHead(nn.Module):
    """Multinomial logistic regression on normalised global embeddings."""

    uses_patches = False
    uses_roi_view = False

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.architecture = {"embed_dim": embed_dim, "num_classes": num_classes}
        self.weight = nn.Parameter(torch.zeros(num_classes, embed_dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, inputs: HeadInputs) -> Tensor:
        return inputs.image @ self.weight.T + self.bias


class TipAdapterHead(nn.Module):
    """Tip-Adapter (Zhang et al. 2022): zero-shot logits + α · exp(−β(1 − f·keysᵀ)) · one-hot cache values.

    ``keys`` are the cached training embeddings; Tip-Adapter-F fine-tunes them (``trainable_keys``).
    """

    uses_patches = False
    uses_roi_view = False

    def __init__(self, embed_dim: int, num_classes: int, cache_size: int, logit_scale: float, trainable_keys: bool):
        super().__init__()
        self.architecture = {
            "embed_dim": embed_dim, "num_classes": num_classes, "cache_size": cache_size,
            "logit_scale": logit_scale, "trainable_keys": trainable_keys,
        }
        self.register_buffer("class_embeddings", torch.zeros(num_classes, embed_dim))
        self.register_buffer("cache_values", torch.zeros(cache_size, num_classes))
        self.register_buffer("alpha", torch.tensor(1.0))
        self.register_buffer("beta", torch.tensor(1.0))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.keys = nn.Parameter(torch.zeros(cache_size, embed_dim), requires_grad=trainable_keys)

    def zero_shot_logits(self, inputs: HeadInputs) -> Tensor:
        return self.logit_scale * inputs.image @ self.class_embeddings.T

    def affinity(self, inputs: HeadInputs) -> Tensor:
        return inputs.image @ self.keys.T

    @staticmethod
    def combine(zero_shot: Tensor, affinity: Tensor, cache_values: Tensor, alpha, beta) -> Tensor:
        return zero_shot + alpha * torch.exp(-beta * (1.0 - affinity)) @ cache_values

    def forward(self, inputs: HeadInputs) -> Tensor:
        return self.combine(self.zero_shot_logits(inputs), self.affinity(inputs), self.cache_values, self.alpha, self.beta)


FUSION_PARAMETERS = ("class_embeddings", "class_queries", "query_proj", "key_proj", "value_proj", "out_proj", "roi_bias",
                     "log_logit_scale")
FUSION_NO_DECAY = ("class_embeddings", "class_queries", "roi_bias", "log_logit_scale")


def fusion_logits(params: dict[str, Tensor], inputs: HeadInputs) -> tuple[Tensor, Tensor]:
    """Logits (S, N, C) and attention (S, N, C, H, L) of S fusion heads of one architecture, each of
    :data:`FUSION_PARAMETERS` stacked on a leading dimension S (:class:`FusionHead` is S = 1).

    Stacked heads share one pass over the patch tokens, the bulk of the cost: the dual view's out-of-fold heads train
    this way (``medfocus_dual`` in methods.py).
    """
    query_proj = params["query_proj"]
    stack, heads, head_dim, token_dim = query_proj.shape
    num_classes = params["class_queries"].shape[1]
    samples, length, _ = inputs.patches.shape
    queries = torch.einsum("shed,scd->sche", query_proj, params["class_queries"])
    folded = torch.einsum("sche,shed->schd", queries, params["key_proj"]) / math.sqrt(head_dim)
    # (S·C·H, D) against each image's (D, L) tokens: the scores come out (N, S·C·H, L), softmax-ready without a copy
    scores = torch.matmul(folded.reshape(stack * num_classes * heads, token_dim), inputs.patches.transpose(1, 2))
    scores = scores.view(samples, stack, num_classes, heads, length)
    scores = scores + params["roi_bias"][None, :, None, :, None] * inputs.roi[:, None, None, None, :]
    attention = scores.softmax(dim=-1)
    pooled = torch.bmm(attention.view(samples, stack * num_classes * heads, length), inputs.patches)
    pooled = pooled.view(samples, stack, num_classes, heads, token_dim)
    values = torch.einsum("nschd,shed->nsche", pooled, params["value_proj"]).reshape(samples, stack, -1)
    fused = F.normalize(inputs.image[:, None, :] + torch.einsum("nsk,sdk->nsd", values, params["out_proj"]), dim=-1)
    scale = params["log_logit_scale"].exp().clamp(max=MAX_LOGIT_SCALE)
    logits = scale[:, None, None] * torch.einsum("nsd,scd->snc", fused, F.normalize(params["class_embeddings"], dim=-1))
    return logits, attention.transpose(0, 1)


class FusionHead(nn.Module):
    """MedFocusCLIP fusion head.

    The class queries (initialised from the class text) attend over the ROI-aware patch tokens with multi-head
    cross-attention whose scores carry an additive ROI bias b_h · roi[l]; the attended values of every (class, head) go
    through an output projection and are added to the global embedding (residual, output projection initialised at
    zero so training starts from zero-shot CLIP). The logits are the scaled cosine between this fused image embedding and
    learnable class embeddings (initialised from the text). The computation is :func:`fusion_logits`.

    Cost: the patch tokens are fixed, so the query is folded into key space, u_{c,h} = W_kᵀ W_q q_c ∈ R^D, and values are
    projected after pooling; attention then costs O(N·L·D·C·H) instead of projecting all N·L tokens every step.
    """

    uses_patches = True
    uses_roi_view = False

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        heads: int,
        head_dim: int,
        roi_bias_strength: float,
        learn_roi_bias: bool,
        logit_scale: float,
        learn_logit_scale: bool,
        num_patches: int,
        token_dim: int | None = None,
    ):
        super().__init__()
        token_dim = token_dim or embed_dim  # heads saved before encoder banks have tokens as wide as the global embedding
        self.architecture = {
            "embed_dim": embed_dim, "num_classes": num_classes, "heads": heads, "head_dim": head_dim,
            "roi_bias_strength": roi_bias_strength, "learn_roi_bias": learn_roi_bias,
            "logit_scale": logit_scale, "learn_logit_scale": learn_logit_scale, "num_patches": num_patches,
            "token_dim": token_dim,
        }
        self.num_patches = num_patches
        self.class_embeddings = nn.Parameter(torch.zeros(num_classes, embed_dim))
        self.class_queries = nn.Parameter(torch.zeros(num_classes, token_dim))
        self.query_proj = nn.Parameter(torch.zeros(heads, head_dim, token_dim))
        self.key_proj = nn.Parameter(torch.zeros(heads, head_dim, token_dim))
        self.value_proj = nn.Parameter(torch.zeros(heads, head_dim, token_dim))
        self.out_proj = nn.Parameter(torch.zeros(embed_dim, num_classes * heads * head_dim))
        self.roi_bias = nn.Parameter(torch.full((heads,), float(roi_bias_strength)), requires_grad=learn_roi_bias)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)), requires_grad=learn_logit_scale)

    def initialise(self, class_init: Tensor, generator: torch.Generator, query_init: Tensor | None = None) -> None:
        """Class embeddings from ``class_init`` (C, D), class queries from ``query_init`` (C, D_tokens; default
        ``class_init``); projections random (seeded); output projection zero."""
        token_dim = self.class_queries.shape[1]
        with torch.no_grad():
            self.class_embeddings.copy_(class_init)
            self.class_queries.copy_(class_init if query_init is None else query_init)
            for weight in (self.query_proj, self.key_proj, self.value_proj):
                weight.copy_(_normal(tuple(weight.shape), 1.0 / math.sqrt(token_dim), generator))
            self.out_proj.zero_()

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in FUSION_NO_DECAY]

    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def _stacked(self, inputs: HeadInputs) -> tuple[Tensor, Tensor]:
        return fusion_logits({name: getattr(self, name)[None] for name in FUSION_PARAMETERS}, inputs)

    def attention(self, inputs: HeadInputs) -> Tensor:
        """(N, C, H, L) softmax attention of each class query (per head) over the patches."""
        return self._stacked(inputs)[1][0]

    def forward(self, inputs: HeadInputs) -> Tensor:
        return self._stacked(inputs)[0][0]


def top_two_margin(cosines: Tensor) -> Tensor:
    """(N,) gap between the best and the second-best class cosine: how decisively a branch picks its class."""
    top = cosines.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


class DualViewHead(nn.Module):
    """Whole image and ROI view side by side, blended per image by a gate (medfocus_dual).

    Two branches: ``whole``, the fusion head on the whole image's tokens with the ROI bias fixed at 0 (exactly what
    medfocus gives in mode ``none``), and ``roi``, a cosine head on the ROI view's embedding (the few-shot CLIP head of
    that view). Their logits are blended per image,

        logits = (1 − γ(x)) · whole(x) + γ(x) · s_r·cos(r̂, E_roi),
        γ(x) = sigmoid(gate_bias + gate_slope · (margin_roi(x) − margin_whole(x)) / margin_scale),

    where a margin is the gap between a branch's two best class cosines: the gate can lean on the ROI branch for the
    images where it is the more decisive one. An image without an ROI (all roi weights 0) gets γ = 0. γ ≡ 0, the
    whole-image head alone, is reachable (gate_bias = −inf), so an ROI that holds nothing costs at most what the gate
    fit gets wrong. The gate is not trained with the branches (on the training images both branches fit perfectly and
    it would learn nothing); see ``medfocus_dual`` in methods.py.
    """

    uses_patches = True
    uses_roi_view = True

    def __init__(self, embed_dim: int, num_classes: int, logit_scale: float, learn_logit_scale: bool, heads: int,
                 head_dim: int, num_patches: int, token_dim: int | None = None):
        super().__init__()
        token_dim = token_dim or embed_dim
        self.architecture = {"embed_dim": embed_dim, "num_classes": num_classes, "logit_scale": logit_scale,
                             "learn_logit_scale": learn_logit_scale, "heads": heads, "head_dim": head_dim,
                             "num_patches": num_patches, "token_dim": token_dim}
        self.whole = FusionHead(embed_dim, num_classes, heads, head_dim, roi_bias_strength=0.0, learn_roi_bias=False,
                                logit_scale=logit_scale, learn_logit_scale=learn_logit_scale, num_patches=num_patches,
                                token_dim=token_dim)
        self.roi = CosineClassifierHead(embed_dim, num_classes, logit_scale, trainable=True, learn_logit_scale=learn_logit_scale)
        self.register_buffer("gate_bias", torch.tensor(float("-inf")))
        self.register_buffer("gate_slope", torch.tensor(0.0))
        self.register_buffer("margin_scale", torch.tensor(1.0))

    def branch_logits(self, inputs: HeadInputs) -> tuple[Tensor, Tensor]:
        """(N, C) logits of the whole-image branch and of the ROI branch."""
        return self.whole(inputs), self.roi(inputs.swap_views())

    @staticmethod
    def gate_feature(whole_logits: Tensor, roi_logits: Tensor, whole_scale: Tensor, roi_scale: Tensor) -> Tensor:
        """(N,) margin of the ROI branch minus margin of the whole-image branch, in cosine units."""
        return top_two_margin(roi_logits / roi_scale) - top_two_margin(whole_logits / whole_scale)

    @torch.no_grad()
    def gate(self, inputs: HeadInputs) -> Tensor:
        """(N,) weight γ of the ROI branch per image."""
        whole_logits, roi_logits = self.branch_logits(inputs)
        return self._gate(whole_logits, roi_logits, inputs.has_roi)

    def _gate(self, whole_logits: Tensor, roi_logits: Tensor, has_roi: Tensor) -> Tensor:
        feature = self.gate_feature(whole_logits, roi_logits, self.whole.logit_scale(), self.roi.logit_scale())
        gamma = torch.sigmoid(self.gate_bias + self.gate_slope * feature / self.margin_scale)
        return torch.where(has_roi, gamma, torch.zeros_like(gamma))

    def forward(self, inputs: HeadInputs) -> Tensor:
        whole_logits, roi_logits = self.branch_logits(inputs)
        gamma = self._gate(whole_logits, roi_logits, inputs.has_roi)[:, None]
        return (1.0 - gamma) * whole_logits + gamma * roi_logits


HEADS: dict[str, type[nn.Module]] = {
    "cosine": CosineClassifierHead,
    "linear": LinearProbeHead,
    "tip_adapter": TipAdapterHead,
    "fusion": FusionHead,
    "dual": DualViewHead,
}


def build_head(kind: str, architecture: dict) -> nn.Module:
    return HEADS[kind](**architecture)
