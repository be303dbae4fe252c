"""LiteMedSAM path speed on CPU, before and after encoding each image once and running LiteMedSAM in ONNX Runtime.

Per image, on the same images and threads:

* encoder: LiteMedSAM's image encoder alone, eager PyTorch vs ONNX Runtime, and their largest output difference;
* before: what segment + features (``model: litemedsam``, mode ``none``) cost in eager PyTorch with two encodes: the
  segmenter (PyTorch encoder + PyTorch box decoding of the ROI policy) and a second encoder pass in the features stage;
* after: the segmenter with ONNX Runtime (encoder and box decoder), whose stored embedding the features stage copies
  (no second pass);
* masks: the ROI of the after path against the before path (Dice; the policy's decodes are the same code).

    OMP_NUM_THREADS=1 python benchmarks/litemedsam_speed.py --root data/demo --limit 20 --threads 1 \
        --out benchmarks/results/litemedsam_speed.json

Seconds are wall-clock per image with models already built (warm), on a machine whose other load is reported
(os.getloadavg) beside them. Stage-level numbers (workers, dask, Zarr) come from running the stages themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from medfocus.pipeline.images import load_image, looks_like_image
from medfocus.pipeline.medsam_lite import EncoderRuntime, preprocess
from medfocus.pipeline.segmenters import create_segmenter, dice_iou, default_policy_for


def _images(root: Path, limit: int) -> list[Path]:
    files = sorted(path for path in root.rglob("*") if looks_like_image(path) and "mask" not in path.name)
    step = max(1, len(files) // limit)
    return files[::step][:limit]


def _timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="a folder of images (searched recursively)")
    parser.add_argument("--dataset", default="demo", help="dataset name: picks the ROI policy (default_policy_for)")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    policy = default_policy_for(args.dataset)
    before = create_segmenter("litemedsam", policy=policy, runtime="torch")
    after = create_segmenter("litemedsam", policy=policy, runtime="onnxruntime")
    # The features stage's second pass before this change: the same encoder in eager PyTorch.
    second_pass = EncoderRuntime(before.net.image_encoder, before.checkpoint, runtime="torch")
    files = _images(args.root, args.limit)
    warm = load_image(files[0])
    before.segment(warm), after.segment(warm)
    rows = []
    for path in files:
        image = load_image(path)
        pixels = preprocess(image)[None]
        torch_embedding, torch_s = _timed(before.encoder, pixels)
        ort_embedding, ort_s = _timed(after.encoder, pixels)
        before_result, before_segment_s = _timed(before.segment, image)
        _, before_features_s = _timed(second_pass, pixels)
        after_result, after_s = _timed(after.segment, image)
        dice, _ = dice_iou(after_result.roi, before_result.roi)
        rows.append({"image": str(path), "encoder_torch_s": torch_s, "encoder_onnxruntime_s": ort_s,
                     "encoder_max_abs_diff": float((torch_embedding - ort_embedding).abs().max()),
                     "before_s": before_segment_s + before_features_s, "after_s": after_s, "roi_dice": dice})
        print(f"{path.name}: before {rows[-1]['before_s']:.2f} s, after {after_s:.2f} s, ROI Dice {dice:.4f}", flush=True)

    def mean(key: str) -> float:
        return float(np.mean([row[key] for row in rows]))

    summary = {
        "command": "python benchmarks/litemedsam_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "images": len(rows), "threads": args.threads, "policy": policy, "load_average_after": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "encoder_torch_s_per_image": mean("encoder_torch_s"), "encoder_onnxruntime_s_per_image": mean("encoder_onnxruntime_s"),
        "encoder_speedup": mean("encoder_torch_s") / mean("encoder_onnxruntime_s"),
        "encoder_max_abs_diff": max(row["encoder_max_abs_diff"] for row in rows),
        "before_s_per_image": mean("before_s"), "after_s_per_image": mean("after_s"),
        "speedup": mean("before_s") / mean("after_s"),
        "roi_dice_mean": mean("roi_dice"), "roi_dice_min": min(row["roi_dice"] for row in rows),
        "per_image": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "per_image"}, indent=2))


if __name__ == "__main__":
    main()
