"""Synthetic cached features for tests and benchmarks, shaped like the feature store's output.

By default the class signal sits only in the ROI patches: global embeddings and patches outside the ROI are pure noise,
so a method can beat chance only by looking at the ROI patch tokens. ``global_signal`` puts signal into the whole-image
embedding too, and ``roi_view_signal`` adds an ROI-view embedding (``roi_global``, as in feature stores of mode ``dual``)
with that much signal (0 = an ROI view that missed: pure noise).
"""

from __future__ import annotations

import torch

from .data import ClassText, FeatureSet


def synthetic_task(
    num_images: int,
    num_classes: int = 3,
    embed_dim: int = 32,
    num_patches: int = 16,
    roi_patches: int = 4,
    signal: float = 1.0,
    templates: int = 2,
    seed: int = 0,
    global_signal: float = 0.0,
    roi_view_signal: float | None = None,
) -> tuple[FeatureSet, ClassText]:
    """A FeatureSet of ``num_images`` images (labels cycling through the classes) and matching class text.

    Each image has ``roi_patches`` patches fully inside its ROI and one half inside; those carry
    ``signal · sqrt(D) · direction[label]`` on top of unit-variance noise. The text embedding of a class is its direction
    plus a little noise per template, so zero-shot on the ROI patches would work but not on the global embedding.
    The global embedding gets ``global_signal · sqrt(D) · direction[label]`` and, when ``roi_view_signal`` is given, the
    ROI view ``roi_global`` is unit-variance noise plus ``roi_view_signal · sqrt(D) · direction[label]``.
    """
    if roi_patches + 1 > num_patches:
        raise ValueError(f"roi_patches + 1 = {roi_patches + 1} must fit in num_patches = {num_patches}")
    generator = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(embed_dim, num_classes, generator=generator)).Q.T  # (C, D) orthonormal
    labels = torch.arange(num_images) % num_classes
    labels = labels[torch.randperm(num_images, generator=generator)]
    global_emb = torch.randn(num_images, embed_dim, generator=generator)
    patch_tokens = torch.randn(num_images, num_patches, embed_dim, generator=generator)
    order = torch.rand(num_images, num_patches, generator=generator).argsort(dim=1)
    roi_weights = torch.zeros(num_images, num_patches)
    roi_weights.scatter_(1, order[:, :roi_patches], 1.0)
    roi_weights.scatter_(1, order[:, roi_patches:roi_patches + 1], 0.5)
    patch_tokens += signal * embed_dim ** 0.5 * roi_weights[..., None] * directions[labels][:, None, :]
    text = directions[:, None, :] + 0.1 * torch.randn(num_classes, templates, embed_dim, generator=generator)
    global_emb += global_signal * embed_dim ** 0.5 * directions[labels]
    roi_global = None
    if roi_view_signal is not None:
        roi_global = torch.randn(num_images, embed_dim, generator=generator)
        roi_global += roi_view_signal * embed_dim ** 0.5 * directions[labels]
    features = FeatureSet(
        global_emb=global_emb,
        patch_tokens=patch_tokens,
        roi_weights=roi_weights,
        labels=labels,
        hashes=[f"synthetic-{seed}-{index:05d}" for index in range(num_images)],
        roi_global=roi_global,
    )
    class_text = ClassText([f"class_{index}" for index in range(num_classes)], torch.nn.functional.normalize(text, dim=-1))
    return features, class_text
