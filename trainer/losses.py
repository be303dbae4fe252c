"""The MedFocusCLIP loss λ·L_c + (1−λ)·L_e.

``logits`` everywhere are the scaled cosines s·cos(image_n, class_c), shape (N, C).

L_c is CLIP's symmetric InfoNCE over a batch, where the "text" paired with image n is the embedding of its class y_n.
In a few-shot batch classes repeat, so several of the N texts are the same embedding: an image's own class text appears
n_c times and other images of its class must not be pushed away as negatives. We therefore use supervised-contrastive
targets — every (image, text) pair of the same class is a positive, with the target mass spread evenly over them:

* image → text: row n of the N×N matrix S[n, m] = logits[n, y_m], target uniform over {m : y_m = y_n}.
  Because columns of one class are identical this equals  −logits[n, y_n] + log Σ_c n_c·exp(logits[n, c])
  (cross-entropy over the classes present, with a log-count prior).
* text → image: column m, softmax over the batch images, target uniform over {n : y_n = y_m}; averaged over the N
  columns this is  Σ_c (n_c / N)·(logsumexp_n logits[n, c] − mean_{n: y_n = c} logits[n, c]).

Both closed forms cost O(N·C) instead of O(N²); ``tests/test_trainer.py`` checks them against the explicit N×N matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Symmetric CLIP-style InfoNCE between images and their class embeddings, repeated classes as positives."""
    num_samples, num_classes = logits.shape
    one_hot = F.one_hot(labels, num_classes).to(logits.dtype)
    counts = one_hot.sum(dim=0)
    present = counts > 0
    log_counts = torch.where(present, counts.clamp_min(1).log(), torch.full_like(counts, float("-inf")))
    own = logits.gather(1, labels[:, None]).squeeze(1)
    image_to_text = (torch.logsumexp(logits + log_counts, dim=1) - own).mean()
    positive_mean = (one_hot * logits).sum(dim=0) / counts.clamp_min(1)
    per_class = torch.logsumexp(logits, dim=0) - positive_mean
    text_to_image = (per_class * counts)[present].sum() / num_samples
    return 0.5 * (image_to_text + text_to_image)


def medfocus_loss(logits: Tensor, labels: Tensor, lambda_: float) -> tuple[Tensor, dict[str, float]]:
    """λ·L_c + (1−λ)·L_e, and both components as floats for the training log.

    At λ = 0 the loss is exactly the cross-entropy and at λ = 1 exactly L_c: the unused term is still reported but
    computed without gradient.
    """
    if lambda_ == 0.0:
        cross_entropy = F.cross_entropy(logits, labels)
        with torch.no_grad():
            contrastive = contrastive_loss(logits, labels)
        total = cross_entropy
    elif lambda_ == 1.0:
        contrastive = contrastive_loss(logits, labels)
        with torch.no_grad():
            cross_entropy = F.cross_entropy(logits, labels)
        total = contrastive
    else:
        contrastive = contrastive_loss(logits, labels)
        cross_entropy = F.cross_entropy(logits, labels)
        total = lambda_ * contrastive + (1.0 - lambda_) * cross_entropy
    return total, {"contrastive": float(contrastive.detach()), "cross_entropy": float(cross_entropy.detach())}
