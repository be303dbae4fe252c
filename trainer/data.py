"""In-memory inputs of the trainer: cached image features of a set of images, and the class prompt embeddings.

The trainer never runs an encoder: the feature store yields these tensors once and every method trains on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class FeatureMismatchError(ValueError):
    """Features, class text or a saved model do not fit together (other encoder, other mode, other classes)."""


def _as_float32(name: str, value: Tensor) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    # The store keeps float16; all arithmetic here is float32 on CPU.
    return value.detach().to(device="cpu", dtype=torch.float32)


@dataclass
class FeatureSet:
    """Cached features of N images: CLIP global embedding, patch tokens and the ROI share of each patch.

    ``roi_global`` is the embedding of the ROI view of each image (an ROI crop or ROI-pooled embedding by the same
    encoder), present only in feature stores of the ``dual`` mode; methods other than ``medfocus_dual`` ignore it.
    """

    global_emb: Tensor  # (N, D)
    patch_tokens: Tensor  # (N, L, D_tokens); D_tokens = D except for an encoder bank
    roi_weights: Tensor  # (N, L) in [0, 1]; all zeros when an image has no ROI
    labels: Tensor  # (N,) long
    hashes: list[str]
    roi_global: Tensor | None = None  # (N, D) or None

    def __post_init__(self) -> None:
        self.global_emb = _as_float32("global_emb", self.global_emb)
        self.patch_tokens = _as_float32("patch_tokens", self.patch_tokens)
        self.roi_weights = _as_float32("roi_weights", self.roi_weights)
        if self.roi_global is not None:
            self.roi_global = _as_float32("roi_global", self.roi_global)
        self.labels = torch.as_tensor(self.labels).to(device="cpu", dtype=torch.long)
        self.hashes = list(self.hashes)
        if self.global_emb.ndim != 2:
            raise FeatureMismatchError(f"global_emb must be (N, D), got shape {tuple(self.global_emb.shape)}")
        n, d = self.global_emb.shape
        # The tokens' width may differ from the global embedding's: an encoder bank's global embedding joins several
        # encoders, its tokens come from one of them.
        if self.patch_tokens.ndim != 3 or self.patch_tokens.shape[0] != n:
            raise FeatureMismatchError(f"patch_tokens must be (N={n}, L, D_tokens), got shape {tuple(self.patch_tokens.shape)}")
        length = self.patch_tokens.shape[1]
        if tuple(self.roi_weights.shape) != (n, length):
            raise FeatureMismatchError(f"roi_weights must be (N={n}, L={length}), got shape {tuple(self.roi_weights.shape)}")
        if self.roi_global is not None and tuple(self.roi_global.shape) != (n, d):
            raise FeatureMismatchError(f"roi_global must be (N={n}, D={d}), got shape {tuple(self.roi_global.shape)}")
        if tuple(self.labels.shape) != (n,):
            raise FeatureMismatchError(f"labels must be (N={n},), got shape {tuple(self.labels.shape)}")
        if len(self.hashes) != n:
            raise FeatureMismatchError(f"hashes must name the N={n} images, got {len(self.hashes)}")
        if n and (self.roi_weights.min() < 0 or self.roi_weights.max() > 1):
            raise ValueError("roi_weights must lie in [0, 1] (the share of each patch inside the ROI)")

    def __len__(self) -> int:
        return self.global_emb.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.global_emb.shape[1]

    @property
    def token_dim(self) -> int:
        return self.patch_tokens.shape[2]

    @property
    def num_patches(self) -> int:
        return self.patch_tokens.shape[1]

    def subset(self, idx) -> "FeatureSet":
        """The images at ``idx`` (indices or a boolean mask), in that order."""
        index = torch.as_tensor(np.asarray(idx))
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(torch.long)
        return FeatureSet(
            global_emb=self.global_emb[index],
            patch_tokens=self.patch_tokens[index],
            roi_weights=self.roi_weights[index],
            labels=self.labels[index],
            hashes=[self.hashes[i] for i in index.tolist()],
            roi_global=None if self.roi_global is None else self.roi_global[index],
        )


@dataclass
class ClassText:
    """Class names and their prompt embeddings.

    ``embeddings`` is (C, T, D), L2-normalised, one row per prompt template; ``None`` when the encoder has no text tower
    (LiteMedSAM). Without text, ``zero_shot`` is refused, and every other method starts its class embeddings from the
    L2-normalised mean training embedding of each class (class prototypes) instead of the mean prompt embedding.
    """

    class_names: list[str]
    embeddings: Tensor | None

    def __post_init__(self) -> None:
        self.class_names = list(self.class_names)
        if not self.class_names:
            raise ValueError("ClassText needs at least one class name")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class names must be unique, got {self.class_names}")
        if self.embeddings is not None:
            self.embeddings = _as_float32("text embeddings", self.embeddings)
            if self.embeddings.ndim != 3 or self.embeddings.shape[0] != len(self.class_names):
                raise FeatureMismatchError(
                    f"text embeddings must be (C={len(self.class_names)}, T, D), got shape {tuple(self.embeddings.shape)}"
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_means(self) -> Tensor | None:
        """(C, D) L2-normalised mean prompt embedding per class (CLIP's prompt ensembling), or None without text."""
        if self.embeddings is None:
            return None
        return torch.nn.functional.normalize(self.embeddings.mean(dim=1), dim=-1)


def check_compatible(features: FeatureSet, text: ClassText) -> None:
    """Refuse features whose labels or width do not fit the class text."""
    if len(features) and (features.labels.min() < 0 or features.labels.max() >= text.num_classes):
        raise FeatureMismatchError(
            f"labels run {int(features.labels.min())}..{int(features.labels.max())} but there are {text.num_classes} classes {text.class_names}"
        )
    if text.embeddings is not None and text.embeddings.shape[-1] != features.embed_dim:
        raise FeatureMismatchError(
            f"image features are {features.embed_dim}-d but the class text embeddings are {text.embeddings.shape[-1]}-d: "
            "they come from different encoders"
        )


def stratified_folds(labels: Tensor, folds: int, seed: int) -> list[Tensor] | str:
    """``folds`` disjoint, stratified index sets covering every image once (for out-of-fold predictions), or the
    reason there are none: each class must have at least ``folds`` images so that every fold has one of each."""
    labels = labels.to(torch.long)
    if len(labels) == 0:
        return "empty training subset"
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    classes, counts = torch.unique(labels, return_counts=True)
    smallest = int(counts.min())
    if smallest < folds:
        name = int(classes[counts.argmin()])
        return f"subset too small for {folds} folds: class {name} has {smallest} < {folds} images"
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(folds)]
    for cls, count in zip(classes.tolist(), counts.tolist()):
        members = (labels == cls).nonzero().flatten().numpy()
        for fold, chunk in enumerate(np.array_split(members[rng.permutation(count)], folds)):
            parts[fold].append(chunk)
    return [torch.from_numpy(np.sort(np.concatenate(chunks))) for chunks in parts]


def validation_split(labels: Tensor, val_fraction: float, min_per_class: int, seed: int) -> tuple[Tensor, Tensor] | str:
    """Stratified (fit, validation) indices of a training subset, or the reason there is none.

    Every class present gives round(val_fraction · n_c) images (at least 1, at most n_c − 1) to validation, as long as the smallest class has
    at least ``min_per_class`` images; otherwise the split would leave too little to fit or to choose anything with.
    """
    labels = labels.to(torch.long)
    classes, counts = torch.unique(labels, return_counts=True)
    if len(labels) == 0:
        return "empty training subset"
    smallest = int(counts.min())
    if smallest < min_per_class:
        name = int(classes[counts.argmin()])
        return f"subset too small for a validation split: class {name} has {smallest} < {min_per_class} images"
    rng = np.random.default_rng(seed)
    fit_parts, val_parts = [], []
    for cls, count in zip(classes.tolist(), counts.tolist()):
        members = (labels == cls).nonzero().flatten().numpy()
        order = members[rng.permutation(count)]
        n_val = min(count - 1, max(1, int(round(val_fraction * count))))
        val_parts.append(order[:n_val])
        fit_parts.append(order[n_val:])
    fit_idx = torch.from_numpy(np.sort(np.concatenate(fit_parts)))
    val_idx = torch.from_numpy(np.sort(np.concatenate(val_parts)))
    return fit_idx, val_idx
