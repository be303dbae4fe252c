"""Pictures of what the segmenter found: every mask painted over the image, the ROI outlined (the paper's Figure 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from medfocus.pipeline.encoders.steering import overlay_masks
from medfocus.pipeline.images import load_image
from medfocus.pipeline.preparation import PreparedDataset
from medfocus.pipeline.store import ImageStore
from PIL import Image

ROI_OUTLINE = np.array([255, 230, 0], dtype=np.uint8)


def roi_outline(roi: np.ndarray) -> np.ndarray:
    """Pixels of the ROI that touch a pixel outside it."""
    padded = np.pad(roi, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return roi & ~interior


def render_masks(image: np.ndarray, labels: np.ndarray, roi: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image at the store resolution with all masks translucent and the ROI outlined (thickened for visibility)."""
    size = labels.shape[::-1]
    frame = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    painted = overlay_masks(frame, labels, alpha)
    outline = roi_outline(roi)
    outline = outline | np.roll(outline, 1, axis=0) | np.roll(outline, 1, axis=1)
    painted[outline] = ROI_OUTLINE
    return painted


def pick_examples(prepared: PreparedDataset, done: set[str], count: int) -> list:
    """Up to ``count`` segmented images, taken round-robin over the classes so every class shows."""
    by_class: dict[str, list] = {}
    for entry in prepared.entries:
        if entry.hash in done:
            by_class.setdefault(entry.label, []).append(entry)
    picked, round_index = [], 0
    while len(picked) < count and any(round_index < len(v) for v in by_class.values()):
        for label in sorted(by_class):
            if round_index < len(by_class[label]) and len(picked) < count:
                picked.append(by_class[label][round_index])
        round_index += 1
    return picked


def write_gallery(prepared: PreparedDataset, store: ImageStore, output: Path, count: int = 8, title: str = "") -> Path:
    """A grid of (image, masks + ROI) pairs, one row per image, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = pick_examples(prepared, store.done([e.hash for e in prepared.entries]), count)
    if not examples:
        raise FileNotFoundError(f"no segmented images in {store.url}: run the segment stage first")
    columns = 2
    rows = len(examples)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), squeeze=False)
    for row, entry in enumerate(examples):
        arrays, attrs = store.read_image(entry.hash, ("labels", "roi"))
        image = load_image(prepared.image_path(entry))
        size = arrays["labels"].shape[::-1]
        axes[row, 0].imshow(np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)))
        axes[row, 0].set_title(f"{entry.label}", fontsize=8)
        axes[row, 1].imshow(render_masks(image, arrays["labels"], arrays["roi"]))
        roi_index, count = attrs.get("roi_index"), len(attrs.get("masks", []))
        roi_name = f"#{roi_index + 1}" if roi_index is not None else "none"
        axes[row, 1].set_title(f"{count} mask{'' if count == 1 else 's'}, ROI {roi_name}", fontsize=8)
        for axis in axes[row]:
            axis.axis("off")
    _layout_with_title(figure, title)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


_KIND_ORDER = {"label_conflict": 0, "train_test_leak": 1, "duplicate": 2}


def _layout_with_title(figure, title: str) -> None:
    """Tight layout below a figure title: tight_layout ignores suptitle, so half an inch is kept free for it."""
    if not title:
        figure.tight_layout()
        return
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.5 / figure.get_figheight()))


def write_near_duplicate_gallery(pairs: list[dict], output: Path, count: int = 6, title: str = "") -> Path:
    """Up to ``count`` near-copy pairs side by side, one row per pair, saved as PNG.

    ``pairs`` are prepare.json's ``near_duplicates.pairs``. Label conflicts come first, then train/test leaks, then
    duplicates, each weakest match first: those are the pairs that show whether the threshold separates copies from
    distinct images. Each image is titled with its label, split and whether prepare removed it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not pairs:
        raise ValueError("no near-duplicate pairs to draw: prepare found none (see near_duplicate_pairs in prepare.json)")
    chosen = sorted(pairs, key=lambda p: (_KIND_ORDER.get(p["kind"], len(_KIND_ORDER)), p["correlation"]))[:count]
    figure, axes = plt.subplots(len(chosen), 2, figsize=(5.6, 2.9 * len(chosen)), squeeze=False)
    for row, pair in enumerate(chosen):
        for column, path in enumerate(pair["paths"]):
            axis = axes[row, column]
            axis.imshow(load_image(path))
            removed = " · removed" if path in pair["removed"] else ""
            name = Path(path).name
            name = name if len(name) <= 36 else f"{name[:20]}…{name[-15:]}"
            axis.set_title(f"{name}\n{pair['labels'][column]} · {pair['splits'][column]}{removed}", fontsize=7)
            axis.axis("off")
        axes[row, 0].text(1.04, -0.04, f"{pair['kind'].replace('_', ' ')}: {pair['hash_distance']} bits, "
                                        f"correlation {pair['correlation']:.3f}",
                          transform=axes[row, 0].transAxes, ha="center", va="top", fontsize=7)
    _layout_with_title(figure, title)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
