"""Segment-stage speed on CPU: SAM2's automatic mask generator (the paper's setting) against the fast
prompted ROI mode of the same SAM2 model, plus LiteMedSAM, on the same real images in one run.

Images: a fixed seeded sample from ../shared/datasets (about a third from each of brain_tumor,
breast_ultrasound and covid; mixed sizes). Reported per mode: seconds per image (segment() only, model
loading excluded), number of candidate masks, and the IoU of each mode's ROI with the generator's ROI
(both at the 256² store resolution). Process CPU seconds are reported beside wall-clock seconds: on a
shared machine CPU time is what other users' load distorts least.

The generator runs with SAM2's default settings (32x32 points, pred_iou_thresh 0.8, stability 0.95). Without
``--checkpoint`` SAM2 is random-init (torch seed 0): its timings are real, its masks are not, and the random
generator typically keeps no mask at those thresholds (so its ROI, and the ROI IoU, are undefined: "n/a").
That is also the generator's cheapest path (no mask reaches RLE encoding), so random-init timings understate
its cost and the speed-up. With ``--checkpoint auto`` (or a path) the same command measures real weights.

    nice -n 10 python benchmarks/segment_speed.py --images 20 --threads 1 --out benchmarks/segment_speed.json

Each generator result (its seconds and every candidate mask) is written to ``--generator-cache`` as soon as it
is measured; a rerun with the same settings reuses those records (the ROI re-chosen with the current policy),
so a long run can resume and the fast modes can be re-measured without paying for the generator again.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medfocus.pipeline.images import load_image, looks_like_image
from medfocus.pipeline.segmenters import create_segmenter, dice_iou, get_policy
from medfocus.pipeline.segmenters.base import Candidate, assemble_result
from medfocus.pipeline.segmenters.selection import choose, grayscale_work_image

DEFAULT_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
STORE_RESOLUTION = 256
SPEED_DATASETS = ("brain_tumor", "breast_ultrasound", "covid")


def sample_images(datasets_root: Path, count: int, seed: int) -> list[Path]:
    """``count`` images spread evenly over SPEED_DATASETS, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    chosen: list[Path] = []
    for position, name in enumerate(SPEED_DATASETS):
        paths = sorted(p for p in (datasets_root / name).rglob("*") if p.is_file() and looks_like_image(p))
        if not paths:
            raise FileNotFoundError(f"no images under {datasets_root / name}")
        share = count // len(SPEED_DATASETS) + (1 if position < count % len(SPEED_DATASETS) else 0)
        chosen.extend(paths[i] for i in sorted(rng.choice(len(paths), size=share, replace=False)))
    return chosen


def roi_iou(roi: np.ndarray, generator_roi: np.ndarray | None) -> float | None:
    """IoU of two ROIs; None where the generator found no ROI to compare with."""
    return None if generator_roi is None else dice_iou(roi, generator_roi)[1]


def timed_segment(segmenter, image: np.ndarray):
    """segment() with its wall-clock and process CPU seconds (CPU time is what a busy shared machine distorts least)."""
    started, started_cpu = time.perf_counter(), time.process_time()
    result = segmenter.segment(image)
    return result, time.perf_counter() - started, time.process_time() - started_cpu


def amg_result_from_record(record: dict, masks: np.ndarray, image: np.ndarray, policy_name: str):
    """Rebuild the generator's candidates from a saved run and let the current policy choose among them."""
    candidates = [
        Candidate(
            logits=torch.from_numpy(mask).float() * 2 - 1,
            score=info["score"],
            stability=info["stability"],
            source=info["source"],
        )
        for mask, info in zip(masks, record["candidates"])
    ]
    ranked, roi_index = choose(get_policy(policy_name), candidates, grayscale_work_image(image))
    return assemble_result(ranked, roi_index, STORE_RESOLUTION)


def markdown_table(rows: list[dict]) -> str:
    reference, reference_cpu = rows[0]["seconds_mean"], rows[0]["cpu_seconds_mean"]
    lines = [
        "| mode | s/image (mean) | s/image (median) | CPU s/image | speed-up (wall) | speed-up (CPU) "
        "| candidates/image | ROI IoU vs generator ROI (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["roi_iou_mean"] is None:
            iou = "-" if row is rows[0] else "n/a (generator kept no mask)"
        else:
            iou = f"{row['roi_iou_mean']:.3f} (n={row['roi_iou_n']})"
        lines.append(
            f"| {row['mode']} | {row['seconds_mean']:.2f} | {row['seconds_median']:.2f} | {row['cpu_seconds_mean']:.2f} "
            f"| {reference / row['seconds_mean']:.1f}x | {reference_cpu / row['cpu_seconds_mean']:.1f}x "
            f"| {row['candidates_mean']:.1f} | {iou} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--model-size", default="tiny")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.8)
    parser.add_argument("--stability-thresh", type=float, default=0.95)
    parser.add_argument("--checkpoint", default=None, help="SAM2 weights: 'auto' or a path (default: random-init)")
    parser.add_argument("--policy", default="dark-blob", help="ROI policy for the prompted modes and LiteMedSAM")
    parser.add_argument("--reduced-size", type=int, default=512, help="SAM2 input side of the reduced prompted mode")
    parser.add_argument("--generator-cache", type=Path, default=None,
                        help="folder of per-image generator records (default: <out>.generator/); matching records are "
                        "reused, so an interrupted run resumes and other policies re-run without the generator")
    parser.add_argument("--out", type=Path, default=Path("segment_speed.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    images = sample_images(args.datasets, args.images, args.seed)
    common = {"policy": args.policy, "store_resolution": STORE_RESOLUTION}
    if args.checkpoint is None:
        sam2_common = {**common, "allow_random_init": True, "pretrained": False, "model_size": args.model_size}
    else:
        sam2_common = {**common, "checkpoint": args.checkpoint, "model_size": args.model_size}
    modes = {
        "sam2 prompted 1024": lambda: create_segmenter("sam2", mode="prompted", **sam2_common),
        f"sam2 prompted {args.reduced_size}": lambda: create_segmenter(
            "sam2", mode="prompted", image_size=args.reduced_size, **sam2_common
        ),
        "litemedsam prompted 256": lambda: create_segmenter("litemedsam", **common),
    }
    amg_name = f"sam2 generator {args.points_per_side}x{args.points_per_side} @1024"
    generator = create_segmenter(
        "sam2",
        mode="auto",
        points_per_side=args.points_per_side,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh,
        **sam2_common,
    )
    descriptions = {amg_name: generator.describe()}
    cache = args.generator_cache or args.out.with_suffix(".generator")
    cache.mkdir(parents=True, exist_ok=True)
    policy = get_policy(args.policy)
    per_image: dict[str, list[dict]] = {amg_name: []}
    amg_rois: list[np.ndarray | None] = []
    reused = 0
    for index, path in enumerate(images):
        image = load_image(path)
        record_path, masks_path = cache / f"image{index:02d}.json", cache / f"image{index:02d}.npz"
        record = json.loads(record_path.read_text()) if record_path.is_file() and masks_path.is_file() else None
        if record is not None and record["image"] == str(path) and record["generator"] == descriptions[amg_name]:
            masks = np.load(masks_path)["masks"]
            result = amg_result_from_record(record, masks, image, args.policy)
            reused += 1
        else:
            # The steps of Sam2Segmenter.segment in auto mode, spelled out to keep every candidate's full mask.
            started, started_cpu = time.perf_counter(), time.process_time()
            candidates = generator.generator_candidates(image)
            ranked, roi_index = choose(policy, candidates, grayscale_work_image(image))
            result = assemble_result(ranked, roi_index, STORE_RESOLUTION)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
            masks = np.stack([c.mask.numpy() for c in ranked]) if ranked else np.zeros((0, STORE_RESOLUTION, STORE_RESOLUTION), bool)
            record = {
                "image": str(path),
                "size": list(image.shape[:2]),
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "candidates": [{k: info[k] for k in ("score", "stability", "source")} for info in result.masks],
                "generator": descriptions[amg_name],
                "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            np.savez_compressed(masks_path, masks=masks)
            record_path.write_text(json.dumps(record))
            print(f"[generator] {index + 1}/{len(images)} {path.name}: {seconds:.1f} s ({cpu_seconds:.1f} s CPU), "
                  f"{len(result.masks)} masks", flush=True)
        amg_rois.append(result.roi if result.roi_index is not None else None)
        per_image[amg_name].append({k: v for k, v in record.items() if k != "generator"})
    if reused:
        print(f"[generator] {reused} of {len(images)} images reused from {cache} (their seconds as measured then)")

    for name, build in modes.items():
        segmenter = build()
        descriptions[name] = segmenter.describe()
        segmenter.segment(load_image(images[0]))  # warm-up: first-call allocations are not per-image cost
        per_image[name] = []
        for index, path in enumerate(images):
            result, seconds, cpu_seconds = timed_segment(segmenter, load_image(path))
            per_image[name].append(
                {
                    "image": str(path),
                    "seconds": seconds,
                    "cpu_seconds": cpu_seconds,
                    "candidates": [{k: info[k] for k in ("score", "stability", "source")} for info in result.masks],
                    "roi_iou": roi_iou(result.roi, amg_rois[index]),
                }
            )
        print(f"[{name}] done: {np.mean([r['seconds'] for r in per_image[name]]):.2f} s/image", flush=True)

    rows = []
    for name, records in per_image.items():
        seconds = [r["seconds"] for r in records]
        defined = [r["roi_iou"] for r in records if name != amg_name and r["roi_iou"] is not None]
        rows.append(
            {
                "mode": name,
                "seconds_mean": float(np.mean(seconds)),
                "seconds_median": float(np.median(seconds)),
                "cpu_seconds_mean": float(np.mean([r["cpu_seconds"] for r in records])),
                "candidates_mean": float(np.mean([len(r["candidates"]) for r in records])),
                "roi_iou_mean": float(np.mean(defined)) if defined else None,
                "roi_iou_n": len(defined),
            }
        )
    table = markdown_table(rows)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": args.threads},
        "images": [str(p) for p in images],
        "generator_records_reused": reused,
        "summary": rows,
        "segmenters": descriptions,
        "per_image": per_image,
        "note": "SAM2 random-init: timings are real, SAM2 masks and ROI IoUs are not."
        if args.checkpoint is None
        else f"SAM2 weights from {args.checkpoint}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table)
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
