"""How well an automatic ROI finds the annotated region: Dice and IoU against ground-truth masks.

Frame: the ROI comes at the store resolution S (the image stretched to S×S); each ground-truth mask is
resized to S×S with nearest-neighbour sampling and binarised (> 0), so both are compared in the store's frame.

Empty ground truth (``normal`` images: nothing to find): Dice and IoU count 1 if the ROI is empty too and 0
otherwise. Those images are reported in their own group (``empty_gt``) and kept out of the ``lesion`` mean,
which is the number the ROI targets refer to.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from medfocus.pipeline.images import load_image
from medfocus.pipeline.segmenters.base import Segmenter


def dice_iou(prediction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks of one shape; both empty counts as a perfect match (1, 1)."""
    if prediction.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {prediction.shape} vs {truth.shape}")
    prediction = prediction.astype(bool)
    truth = truth.astype(bool)
    intersection = float(np.logical_and(prediction, truth).sum())
    total = float(prediction.sum() + truth.sum())
    if total == 0:
        return 1.0, 1.0
    union = total - intersection
    return 2.0 * intersection / total, intersection / union


def load_truth_mask(path: str | Path, size: int) -> np.ndarray:
    """Ground-truth mask resized (nearest) to size×size, as bool."""
    with Image.open(path) as mask:
        mask = mask.convert("L").resize((size, size), Image.Resampling.NEAREST)
        return np.asarray(mask) > 0


def mask_path_for(image_path: Path, images_root: Path, masks_root: Path, mask_suffix: str) -> Path:
    """``masks_root / <same relative folder> / <image stem><mask_suffix>``."""
    relative = image_path.relative_to(images_root)
    return masks_root / relative.parent / f"{relative.stem}{mask_suffix}"


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def evaluate_roi(
    segmenter: Segmenter,
    image_paths_with_classes: Iterable[tuple[str | Path, str]],
    masks_root: str | Path,
    mask_suffix: str = "_mask.png",
    images_root: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Segment every image, compare its ROI with the ground truth, return per-class and overall numbers.

    ``images_root`` is the folder the image paths are relative to (default: the parent of each image's class
    folder, i.e. ``<root>/<class>/<image>``); masks live at the same relative path under ``masks_root`` with
    ``mask_suffix`` replacing the image suffix. Returns ``{"per_class": {class: summary}, "lesion": summary,
    "empty_gt": summary, "overall": summary, "per_image": [...], "segmenter": describe()}`` where a summary is
    ``{"n", "dice", "iou", "dice_median", "seconds_per_image", "cpu_seconds_per_image"}``; seconds (wall clock)
    and CPU seconds (this process, all threads) count ``segment()`` only, not file reading.
    """
    masks_root = Path(masks_root)
    per_image: list[dict] = []
    items = list(image_paths_with_classes)
    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="roi-eval", unit="img")
    for image_path, class_name in iterator:
        image_path = Path(image_path)
        root = Path(images_root) if images_root is not None else image_path.parent.parent
        truth_path = mask_path_for(image_path, root, masks_root, mask_suffix)
        if not truth_path.is_file():
            raise FileNotFoundError(f"no ground-truth mask {truth_path} for {image_path}")
        image = load_image(image_path)
        started, started_cpu = time.perf_counter(), time.process_time()
        result = segmenter.segment(image)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
        truth = load_truth_mask(truth_path, result.roi.shape[0])
        dice, iou = dice_iou(result.roi, truth)
        per_image.append(
            {
                "image": str(image_path),
                "class": class_name,
                "dice": dice,
                "iou": iou,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "empty_gt": not truth.any(),
                "roi_found": result.roi_index is not None,
                "roi_source": result.masks[result.roi_index]["source"] if result.roi_index is not None else None,
            }
        )
    return summarize(per_image, segmenter.describe())


def summarize(per_image: list[dict], description: dict | None = None) -> dict:
    """Group per-image records (dice, iou, seconds, class, empty_gt) into the evaluate_roi report."""
    by_class: dict[str, list[dict]] = defaultdict(list)
    for record in per_image:
        by_class[record["class"]].append(record)

    def summary_of(records: list[dict]) -> dict:
        dices = [r["dice"] for r in records]
        return {
            "n": len(records),
            "dice": _mean(dices),
            "iou": _mean([r["iou"] for r in records]),
            "dice_median": float(np.median(dices)) if dices else float("nan"),
            "seconds_per_image": _mean([r["seconds"] for r in records]),
            "cpu_seconds_per_image": _mean([r["cpu_seconds"] for r in records if "cpu_seconds" in r]),
        }

    return {
        "per_class": {name: summary_of(records) for name, records in sorted(by_class.items())},
        "lesion": summary_of([r for r in per_image if not r["empty_gt"]]),
        "empty_gt": summary_of([r for r in per_image if r["empty_gt"]]),
        "overall": summary_of(per_image),
        "per_image": per_image,
        "segmenter": description,
    }


def list_class_images(images_root: str | Path) -> list[tuple[Path, str]]:
    """(image path, class) for every image of a ``<root>/<class>/<image>`` dataset, sorted by name."""
    from medfocus.pipeline.images import looks_like_image

    images_root = Path(images_root)
    found = []
    for class_dir in sorted(p for p in images_root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.iterdir()):
            if looks_like_image(path):
                found.append((path, class_dir.name))
    return found


def split_tune_report(
    items: list[tuple[Path, str]], seed: int = 0
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Fixed, seeded, class-stratified halves: tune on the first, report on the second."""
    by_class: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for item in sorted(items, key=lambda pair: (pair[1], str(pair[0]))):
        by_class[item[1]].append(item)
    rng = np.random.default_rng(seed)
    tune, report = [], []
    for class_name in sorted(by_class):
        members = by_class[class_name]
        order = rng.permutation(len(members))
        half = len(members) // 2
        tune.extend(members[i] for i in order[:half])
        report.extend(members[i] for i in order[half:])
    return tune, report
