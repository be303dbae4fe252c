"""EfficientNet-Lite0/1/2 encoder speed on CPU: seconds per image at each model's input size (224/240/260).

Per model, on the same images and threads, with the encoder already built (warm, one warm-up pass):

* preprocess: letterbox + normalise (the encoder's ``preprocess``);
* torch: ``encode_images`` of one image (global + patch tokens), eager PyTorch, batch 1;
* torch_batch: the same over all images in one batch, per image;
* onnxruntime: the network (``forward_features``) exported to ONNX (batch 1, opset 17) and run by ONNX Runtime with
  as many threads, and its largest output difference from PyTorch, to judge whether an ONNX path would pay.

Images are generated (speed does not depend on content), or read from ``--root``.

    OMP_NUM_THREADS=1 python benchmarks/efficientnet_speed.py --limit 8 --threads 1 \
        --out benchmarks/results/efficientnet_speed.json

Seconds are wall-clock medians, on a machine whose other load is reported (os.getloadavg) beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medfocus.pipeline.encoders.efficientnet import EfficientNetLiteEncoder
from medfocus.pipeline.images import load_image, looks_like_image
from medfocus.pipeline.vocabulary import EFFICIENTNET_LITE_MODELS


def _images(root: Path | None, limit: int) -> list[np.ndarray]:
    if root is None:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 255, (512, 448, 3), dtype=np.uint8) for _ in range(limit)]
    files = sorted(path for path in root.rglob("*") if looks_like_image(path) and "mask" not in path.name)
    return [load_image(path) for path in files[:: max(1, len(files) // limit)][:limit]]


def _median_seconds(function, inputs) -> tuple[float, list]:
    times, outputs = [], []
    for value in inputs:
        started = time.perf_counter()
        outputs.append(function(value))
        times.append(time.perf_counter() - started)
    return statistics.median(times), outputs


def _onnx_session(encoder: EfficientNetLiteEncoder, folder: Path, threads: int):
    import onnxruntime

    path = folder / f"{encoder.model_name}.onnx"
    example = torch.zeros(1, 3, encoder.image_size, encoder.image_size)

    class Features(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, batch):
            return self.net.forward_features(batch)

    with torch.inference_mode():
        torch.onnx.export(Features(encoder.model).eval(), (example,), str(path), input_names=["image"],
                          output_names=["features"], opset_version=17, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(model: str, images: list[np.ndarray], threads: int, folder: Path) -> dict:
    encoder = EfficientNetLiteEncoder(model)
    preprocess_s, tensors = _median_seconds(encoder.preprocess, images)
    encoder.encode_images(tensors[0][None])  # warm-up
    torch_s, outputs = _median_seconds(lambda tensor: encoder.encode_images(tensor[None]), tensors)
    started = time.perf_counter()
    encoder.encode_images(torch.stack(tensors))
    batch_s = (time.perf_counter() - started) / len(tensors)
    session = _onnx_session(encoder, folder, threads)

    def run(tensor):
        return session.run(None, {"image": tensor[None].numpy()})[0]

    run(tensors[0])  # warm-up
    onnx_s, onnx_maps = _median_seconds(run, tensors)
    with torch.inference_mode():
        torch_maps = [encoder.model.forward_features(tensor[None]).numpy() for tensor in tensors]
    difference = max(float(np.abs(a - b).max()) for a, b in zip(torch_maps, onnx_maps))
    return {"model": model, "input_size": encoder.image_size, "grid": list(encoder.grid),
            "global_shape": list(outputs[0][0].shape[1:]), "patches_shape": list(outputs[0][1].shape[1:]),
            "preprocess_s_per_image": preprocess_s, "torch_s_per_image": torch_s, "torch_batch_s_per_image": batch_s,
            "onnxruntime_s_per_image": onnx_s, "onnxruntime_speedup": torch_s / onnx_s,
            "onnxruntime_max_abs_diff": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="a folder of images (default: generated 512x448 images)")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = _images(args.root, args.limit)
    with tempfile.TemporaryDirectory() as folder:
        results = [measure(model, images, args.threads, Path(folder)) for model in EFFICIENTNET_LITE_MODELS]
    report = {"command": "python " + " ".join(sys.argv), "images": len(images), "threads": args.threads,
              "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_average_after": list(os.getloadavg()),
              "cpu": platform.machine(), "torch": torch.__version__, "models": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in results:
        print(f"{row['model']} {row['input_size']}²: preprocess {row['preprocess_s_per_image'] * 1000:.1f} ms, torch "
              f"{row['torch_s_per_image'] * 1000:.1f} ms (batch {row['torch_batch_s_per_image'] * 1000:.1f} ms), "
              f"onnxruntime {row['onnxruntime_s_per_image'] * 1000:.1f} ms (max diff {row['onnxruntime_max_abs_diff']:.1e})")


if __name__ == "__main__":
    main()
