"""How much of each encoder patch an ROI covers: exact areas, whatever the mask's and the grid's resolutions."""

from __future__ import annotations

import numpy as np


def _cell_coverage(n_pixels: int, n_cells: int, start: float, extent: float) -> np.ndarray:
    """(n_cells, n_pixels): the share of each grid cell covered by each pixel.

    Pixels tile ``[start, start + extent)`` of the unit interval, cells tile ``[0, 1)``: exact interval overlaps,
    so the result is right whether or not the grid divides the mask.
    """
    pixel_edges = start + extent * np.arange(n_pixels + 1) / n_pixels
    cell_edges = np.arange(n_cells + 1) / n_cells
    low = np.maximum(cell_edges[:-1, None], pixel_edges[None, :-1])
    high = np.minimum(cell_edges[1:, None], pixel_edges[None, 1:])
    return np.clip(high - low, 0.0, None) * n_cells


def roi_patch_weights(roi: np.ndarray, grid: tuple[int, int], image_shape: tuple[int, ...] | None = None,
                      placement: str = "centre") -> np.ndarray:
    """(gh * gw,) float32: the fraction of each encoder patch (row-major) that lies inside ``roi``, in [0, 1].

    ``roi`` covers the whole image at any resolution. Encoders fit the image's longer side to their square input
    and pad the shorter one: CLIP encoders centre it between black bars (``placement="centre"``), LiteMedSAM pads
    at the bottom/right (``"top-left"``). A non-square ``image_shape`` (H, W, ...) thus puts the ROI in a band and
    the padding's patches get weight 0. Without ``image_shape`` the image is taken to be square.
    """
    roi = np.asarray(roi, dtype=bool)
    if roi.ndim != 2:
        raise ValueError(f"roi must be a 2-D mask, got shape {roi.shape}")
    grid_h, grid_w = grid
    height, width = (image_shape[0], image_shape[1]) if image_shape is not None else (1, 1)
    longer = max(height, width)
    extent_y, extent_x = height / longer, width / longer
    if placement not in ("centre", "top-left"):
        raise ValueError(f"placement must be 'centre' or 'top-left', got {placement!r}")
    centred = placement == "centre"
    rows = _cell_coverage(roi.shape[0], grid_h, (1.0 - extent_y) / 2 if centred else 0.0, extent_y)
    cols = _cell_coverage(roi.shape[1], grid_w, (1.0 - extent_x) / 2 if centred else 0.0, extent_x)
    weights = rows @ roi.astype(np.float64) @ cols.T
    return np.clip(weights, 0.0, 1.0).astype(np.float32).reshape(-1)
