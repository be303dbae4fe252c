"""PNG figures: accuracy vs training fraction (the paper's Figure 2), confusion matrix, ROI/attention overlay.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot's global state.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .config import METHODS

RANDOM_INIT_WARNING = "RANDOM-INIT ENCODER (no pretrained weights) — not real results"
# Panels in this order: the whole image first, then the ROI steering modes, then the dual view; unknown modes after.


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120)
    return path


def _method_colours(methods: list[str]) -> dict[str, tuple]:
    """One colour per method, the same in every panel: the trainer's methods in a fixed order, others after them."""
    known = [method for method in METHODS if method in methods] + sorted(set(methods) - set(METHODS))
    palette = colormaps["tab10"]
    return {method: palette(index % 10) for index, method in enumerate(known)}


def plot_accuracy_vs_fraction(aggregated: dict, path: str | Path, title: str, weights_source: str | None,
                              random_init: bool) -> Path:
    """Test accuracy (mean ± std over seeds) against training fraction: one panel per ROI mode, one line per method.

    Uses the fraction groups of :func:`~medfocus.trainer.metrics.aggregate`; with none, the k-shot groups (shots per
    class on the x axis). Panels share the y axis, the legend sits outside the panels, and the title (and a watermark
    in every panel) says so when ``random_init`` (the caller judges its weights source: provenance is not the trainer's).
    """
    groups = [group for group in aggregated["groups"] if group.get("fraction") is not None]
    axis_key, axis_label = "fraction", "training fraction"
    if not groups:
        groups = [group for group in aggregated["groups"] if group.get("shots") is not None]
        axis_key, axis_label = "shots", "shots per class"
    if not groups:
        raise ValueError("no fraction or shots groups to plot")
    modes = list(dict.fromkeys(group["mode"] for group in groups))  # the protocol's order (evaluate.modes)
    lines: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for group in groups:
        accuracy = group["accuracy"]
        lines.setdefault((group["mode"], group["method"]), []).append(
            (group[axis_key], 100.0 * accuracy["mean"], 100.0 * accuracy["std"]))
    colours = _method_colours([method for _, method in lines])
    ticks = sorted({point[0] for points in lines.values() for point in points})

    columns = min(len(modes), 3)
    rows = math.ceil(len(modes) / columns)
    figure = Figure(figsize=(max(3.8 * columns, 6.0), 3.2 * rows + 1.6), layout="constrained")
    panels = np.atleast_1d(figure.subplots(rows, columns, sharey=True, squeeze=False)).ravel()
    handles: dict[str, object] = {}
    for panel, mode in zip(panels, modes):
        for (line_mode, method), points in sorted(lines.items()):
            if line_mode != mode:
                continue
            points.sort()
            xs, means, stds = zip(*points)
            handles[method] = panel.errorbar(xs, means, yerr=stds, marker="o", markersize=4, capsize=3, linewidth=1.4,
                                             color=colours[method], label=method)
        panel.set_xscale("log")
        panel.set_xticks(ticks)
        panel.set_xticklabels([f"{100 * tick:g}%" if axis_key == "fraction" else f"{tick:g}" for tick in ticks], fontsize=8)
        panel.minorticks_off()
        panel.set_xlabel(axis_label, fontsize=9)
        panel.grid(True, alpha=0.3)
        panel.set_title(f"ROI mode: {mode}", fontsize=10)
        if random_init:
            panel.text(0.5, 0.5, "RANDOM INIT", transform=panel.transAxes, fontsize=22, color="red", alpha=0.15,
                       ha="center", va="center", rotation=20)
    for panel in panels[len(modes):]:
        panel.set_visible(False)
    for panel in panels[::columns]:
        panel.set_ylabel("test accuracy (%)\nmean ± std over seeds", fontsize=9)
    ordered = [method for method in colours if method in handles]
    figure.legend([handles[method] for method in ordered], ordered, loc="outside lower center", ncols=min(len(ordered), 4),
                  fontsize=9, frameon=False)
    full_title = f"{title}\nencoder weights: {weights_source}"
    if random_init:
        full_title = f"{RANDOM_INIT_WARNING}\n{full_title}"
    figure.suptitle(full_title, fontsize=10, color="red" if random_init else "black")
    return _save(figure, path)


def plot_confusion_matrix(cm, class_names: list[str], path: str | Path, title: str) -> Path:
    """Counts (rows: true class, columns: predicted), coloured by the row share."""
    counts = np.asarray(cm, dtype=np.int64)
    num_classes = len(class_names)
    if counts.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix must be {num_classes}×{num_classes}, got {counts.shape}")
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.7 * num_classes
    figure = Figure(figsize=(size + 1.0, size))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="share of the true class")
    for row in range(num_classes):
        for column in range(num_classes):
            axes.text(column, row, str(counts[row, column]), ha="center", va="center",
                      color="white" if shares[row, column] > 0.5 else "black")
    axes.set_xticks(range(num_classes))
    axes.set_yticks(range(num_classes))
    axes.set_xticklabels(class_names, rotation=30, ha="right")
    axes.set_yticklabels(class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def _patch_grid(num_patches: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        if grid[0] * grid[1] != num_patches:
            raise ValueError(f"grid {grid} does not hold {num_patches} patches")
        return grid
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches are not a square grid: pass grid=(rows, columns)")
    return side, side


def plot_attention_overlay(image, roi_weights, attention, path: str | Path, title: str, grid: tuple[int, int] | None = None) -> Path:
    """Image | ROI weights over it | attention over it, side by side.

    ``image``: the picture the patch grid covers (H×W or H×W×3 array, or a PIL image) — for the crop mode, the crop;
    ``roi_weights`` and ``attention``: (L,) per-patch values (e.g. one class row of
    :func:`~medfocus.trainer.methods.fusion_attention`), drawn as a grid stretched over the image.
    """
    picture = np.asarray(image)
    roi = np.asarray(roi_weights.detach().cpu() if hasattr(roi_weights, "detach") else roi_weights, dtype=np.float64)
    weights = np.asarray(attention.detach().cpu() if hasattr(attention, "detach") else attention, dtype=np.float64)
    if roi.shape != weights.shape or roi.ndim != 1:
        raise ValueError(f"roi_weights and attention must both be (L,), got {roi.shape} and {weights.shape}")
    rows, columns = _patch_grid(len(roi), grid)
    height, width = picture.shape[:2]
    extent = (0, width, height, 0)
    figure = Figure(figsize=(10.5, 3.8))
    panels = figure.subplots(1, 3)
    gray = picture.ndim == 2
    for panel in panels:
        panel.imshow(picture, cmap="gray" if gray else None, extent=extent)
        panel.set_axis_off()
    panels[0].set_title("image", fontsize=9)
    panels[1].imshow(roi.reshape(rows, columns), cmap="Greens", alpha=0.5, vmin=0.0, vmax=1.0, extent=extent, interpolation="nearest")
    panels[1].set_title("ROI share per patch", fontsize=9)
    shown = panels[2].imshow(weights.reshape(rows, columns), cmap="inferno", alpha=0.55, extent=extent, interpolation="nearest")
    figure.colorbar(shown, ax=panels[2], fraction=0.046, pad=0.04)
    panels[2].set_title("fusion attention", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)
