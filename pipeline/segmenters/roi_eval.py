"""How well an automatic ROI finds the annotated region: against ground-truth masks and/or boxes.

Ground truth (:class:`GroundTruth`), per image, at the image's relative path under the dataset root:

- masks: ``<masks>/<relative folder>/<stem><suffix>`` (PNG, > 0 inside). Dice and IoU of the ROI mask.
- boxes, YOLO text files: ``<boxes>/<relative folder>/<stem>.txt``, one box per line ``label x_center y_center width
  height`` in fractions of the image's width and height. With several boxes the ground-truth box is their *union box*
  (the smallest box holding all of them); the report says how many an image had.
- boxes, CSV: a file ``path,x0,y0,x1,y1`` (header row required) in pixels of the original image, ``path`` relative to
  the dataset root (or absolute); several rows for one path are several boxes, a row with empty coordinates says
  "no lesion".

An image with no box (no file, an empty file, no CSV row) counts as *no lesion*. With masks only, an image's box is its
mask's bounding box and an empty mask is no lesion.

Measures, all in the store's frame (the image stretched to S×S; fractions of width/height mean the same in every frame):
box IoU (the ROI mask's bounding box against the ground-truth box), hit (the ROI mask covers at least half of the
ground-truth box's pixels), and with masks Dice and IoU (each mask resized to S×S, nearest, binarised > 0). Images with
a lesion are summarised in ``lesion``; no-lesion images apart in ``empty_gt`` (there: the ROI's mean area and how
often any ROI was chosen; with masks, Dice/IoU count 1 if the ROI is empty too and 0 otherwise), kept out of the
``lesion`` mean, which is the number the ROI targets refer to.
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
from medfocus.pipeline.segmenters.policies import RoiInputError


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


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of width and height


def union_box(boxes: list[Box]) -> Box:
    """The smallest box holding every box."""
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def box_iou(a: Box, b: Box) -> float:
    """IoU of two boxes (fractions; the same in every frame the image is stretched to)."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_box(mask: np.ndarray) -> Box | None:
    """Bounding box of a boolean mask as fractions (x1, y1 exclusive); None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    height, width = mask.shape
    return (cols[0] / width, rows[0] / height, (cols[-1] + 1) / width, (rows[-1] + 1) / height)


def box_coverage(mask: np.ndarray, box: Box) -> float:
    """Share of the box's pixels (in ``mask``'s frame; at least one pixel) that the mask covers."""
    height, width = mask.shape
    x0, x1 = int(np.floor(box[0] * width)), int(np.ceil(box[2] * width))
    y0, y1 = int(np.floor(box[1] * height)), int(np.ceil(box[3] * height))
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    return float(mask[y0:y1, x0:x1].mean())


HIT_COVERAGE = 0.5  # a hit: the ROI covers at least half of the ground-truth box


def box_scores(roi: np.ndarray, truth_box: Box) -> dict[str, float]:
    """Box IoU (the ROI's bounding box against ``truth_box``) and hit (the ROI covers >= half of the box)."""
    roi_box = mask_box(roi)
    return {"box_iou": box_iou(roi_box, truth_box) if roi_box is not None else 0.0,
            "box_hit": float(box_coverage(roi, truth_box) >= HIT_COVERAGE)}


class BoxFileError(RoiInputError):
    """A malformed box file or CSV row: the message names the file and the line."""


def _clip_box(box: Box, where: str) -> Box:
    x0, y0, x1, y1 = (min(max(value, 0.0), 1.0) for value in box)
    if not (x1 > x0 and y1 > y0):
        raise BoxFileError(f"{where}: empty box {box}")
    return (x0, y0, x1, y1)


def read_yolo_boxes(path: Path) -> list[Box]:
    """The boxes of a YOLO text file (``label x_center y_center width height`` per line, fractions); [] when it is empty."""
    boxes = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 5:
                raise ValueError
            cx, cy, w, h = (float(value) for value in fields[1:])
        except ValueError:
            raise BoxFileError(f"{path}:{number}: expected 'label x_center y_center width height' (fractions), "
                               f"got {line.strip()!r}") from None
        boxes.append(_clip_box((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), f"{path}:{number}"))
    return boxes


def read_box_csv(path: Path) -> dict[str, list[tuple[float, float, float, float]]]:
    """``path,x0,y0,x1,y1`` rows (pixels) by path as written; a row with empty coordinates gives the path no box."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader, [])]
        if header != ["path", "x0", "y0", "x1", "y1"]:
            raise BoxFileError(f"{path}:1: expected the header 'path,x0,y0,x1,y1', got {','.join(header)!r}")
        rows: dict[str, list] = {}
        for number, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != 5:
                raise BoxFileError(f"{path}:{number}: expected 5 columns path,x0,y0,x1,y1, got {len(row)}")
            key, coords = row[0].strip(), [cell.strip() for cell in row[1:]]
            boxes = rows.setdefault(key, [])
            if not any(coords):
                continue
            try:
                x0, y0, x1, y1 = (float(value) for value in coords)
            except ValueError:
                raise BoxFileError(f"{path}:{number}: coordinates must be numbers (pixels), got {coords}") from None
            if not (x1 > x0 and y1 > y0):
                raise BoxFileError(f"{path}:{number}: x1 > x0 and y1 > y0 needed, got {coords}")
            boxes.append((x0, y0, x1, y1))
    return rows


class GroundTruth:
    """Where each image's ground truth is: a mask folder, box files (a YOLO folder or a CSV), or both (module doc)."""

    def __init__(self, masks_root: str | Path | None = None, mask_suffix: str = "_mask.png",
                 boxes: str | Path | None = None) -> None:
        if masks_root is None and boxes is None:
            raise RoiInputError("give ground truth: --masks FOLDER, --boxes FOLDER|FILE.csv, or both")
        self.masks_root = Path(masks_root) if masks_root is not None else None
        self.mask_suffix = mask_suffix
        self.boxes = Path(boxes) if boxes is not None else None
        self.box_rows = None
        if self.boxes is not None:
            if self.boxes.is_file() and self.boxes.suffix.lower() == ".csv":
                self.box_rows = read_box_csv(self.boxes)
            elif not self.boxes.is_dir():
                raise FileNotFoundError(f"--boxes {self.boxes}: no such folder (YOLO .txt files) or .csv file")

    @property
    def kind(self) -> str:
        """``masks``, ``yolo-boxes`` or ``csv-boxes``: where the lesion's box comes from."""
        if self.boxes is None:
            return "masks"
        return "csv-boxes" if self.box_rows is not None else "yolo-boxes"

    def describe(self) -> dict:
        return {"kind": self.kind, "masks": str(self.masks_root) if self.masks_root else None,
                "mask_suffix": self.mask_suffix if self.masks_root else None,
                "boxes": str(self.boxes) if self.boxes else None,
                "box_rule": "with several boxes per image, their union box", "hit": f"the ROI covers >= {HIT_COVERAGE:.0%} "
                "of the ground-truth box", "no_lesion": "no box (no file, an empty file, no CSV row)" if self.boxes
                else "an empty mask"}

    def mask_path(self, image_path: Path, images_root: Path) -> Path | None:
        if self.masks_root is None:
            return None
        path = mask_path_for(image_path, images_root, self.masks_root, self.mask_suffix)
        if not path.is_file():
            raise FileNotFoundError(f"no ground-truth mask {path} for {image_path}")
        return path

    def image_boxes(self, image_path: Path, images_root: Path, image_hw: tuple[int, int]) -> list[Box] | None:
        """The image's boxes as fractions ([] = no lesion); None when the ground truth has no boxes (masks only)."""
        if self.boxes is None:
            return None
        relative = image_path.relative_to(images_root)
        if self.box_rows is None:
            path = self.boxes / relative.parent / f"{relative.stem}.txt"
            return read_yolo_boxes(path) if path.is_file() else []
        rows = self.box_rows.get(relative.as_posix())
        if rows is None:
            rows = self.box_rows.get(str(image_path.resolve()), [])
        height, width = image_hw
        return [_clip_box((x0 / width, y0 / height, x1 / width, y1 / height), f"{self.boxes}: {relative.as_posix()}")
                for x0, y0, x1, y1 in rows]

    def truth_box(self, image_path: Path, images_root: Path, image_hw: tuple[int, int],
                  mask: np.ndarray | None) -> tuple[Box | None, int]:
        """The lesion's box (the union of the image's boxes, or with masks only the mask's box) and the box count."""
        boxes = self.image_boxes(image_path, images_root, image_hw)
        if boxes is None:
            box = mask_box(mask) if mask is not None else None
            return box, int(box is not None)
        return (union_box(boxes) if boxes else None), len(boxes)


def evaluate_roi(
    segmenter: Segmenter,
    image_paths_with_classes: Iterable[tuple[str | Path, str]],
    masks_root: str | Path | None = None,
    mask_suffix: str = "_mask.png",
    images_root: str | Path | None = None,
    progress: bool = False,
    boxes: str | Path | None = None,
) -> dict:
    """Segment every image, compare its ROI with the ground truth (masks, boxes or both), return per-class and overall
    numbers.

    ``images_root`` is the folder the image paths are relative to (default: the parent of each image's class
    folder, i.e. ``<root>/<class>/<image>``); ground truth lives at the same relative path (module docstring).
    Returns ``{"per_class": {class: summary}, "lesion": summary, "empty_gt": summary, "overall": summary,
    "per_image": [...], "segmenter": describe(), "ground_truth": ...}`` where a summary has ``n``, ``roi_area``,
    ``roi_found_rate``, ``seconds_per_image``, ``cpu_seconds_per_image``; with masks ``dice``, ``iou``,
    ``dice_median``; and ``n_boxed``, ``box_iou``, ``box_iou_median``, ``hit_rate`` over its images with a lesion
    box. Seconds (wall clock) and CPU seconds (this process, all threads) count ``segment()`` only.
    """
    truth = GroundTruth(masks_root, mask_suffix, boxes)
    per_image: list[dict] = []
    items = list(image_paths_with_classes)
    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="roi-eval", unit="img")
    for image_path, class_name in iterator:
        image_path = Path(image_path)
        root = Path(images_root) if images_root is not None else image_path.parent.parent
        mask_path = truth.mask_path(image_path, root)
        image = load_image(image_path)
        started, started_cpu = time.perf_counter(), time.process_time()
        result = segmenter.segment(image)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
        size = result.roi.shape[0]
        mask = load_truth_mask(mask_path, size) if mask_path is not None else None
        truth_box, box_count = truth.truth_box(image_path, root, image.shape[:2], mask)
        record = {
            "image": str(image_path),
            "class": class_name,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "empty_gt": truth_box is None,
            "roi_found": result.roi_index is not None,
            "roi_area": float(result.roi.mean()),
            "roi_source": result.masks[result.roi_index]["source"] if result.roi_index is not None else None,
        }
        if mask is not None:
            record["dice"], record["iou"] = dice_iou(result.roi, mask)
        if truth_box is not None:
            record |= box_scores(result.roi, truth_box) | {"truth_box": list(truth_box), "truth_boxes": box_count}
        per_image.append(record)
    return summarize(per_image, segmenter.describe()) | {"ground_truth": truth.describe()}


def summarize(per_image: list[dict], description: dict | None = None) -> dict:
    """Group per-image records (dice, iou, box_iou, box_hit, seconds, class, empty_gt) into the evaluate_roi report."""
    by_class: dict[str, list[dict]] = defaultdict(list)
    for record in per_image:
        by_class[record["class"]].append(record)
    has_masks = any("dice" in record for record in per_image)
    has_boxes = any("box_iou" in record for record in per_image)

    def summary_of(records: list[dict]) -> dict:
        summary: dict = {"n": len(records)}
        if has_masks:
            dices = [r["dice"] for r in records if "dice" in r]
            summary |= {"dice": _mean(dices), "iou": _mean([r["iou"] for r in records if "iou" in r]),
                        "dice_median": float(np.median(dices)) if dices else float("nan")}
        if has_boxes:
            boxed = [r for r in records if "box_iou" in r]
            summary |= {"n_boxed": len(boxed), "box_iou": _mean([r["box_iou"] for r in boxed]),
                        "box_iou_median": float(np.median([r["box_iou"] for r in boxed])) if boxed else float("nan"),
                        "hit_rate": _mean([r["box_hit"] for r in boxed])}
        summary |= {
            "roi_area": _mean([r["roi_area"] for r in records if "roi_area" in r]),
            "roi_found_rate": _mean([float(r["roi_found"]) for r in records if "roi_found" in r]),
            "seconds_per_image": _mean([r["seconds"] for r in records]),
            "cpu_seconds_per_image": _mean([r["cpu_seconds"] for r in records if "cpu_seconds" in r]),
        }
        return summary

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
