"""Encoder API throughput against a bare ``encode_image`` loop, per steering mode; feature bytes per image.

For every model the same synthetic batches go through

* bare: ``model.encode_image(pixels)`` on batches preprocessed beforehand (the floor any feature stage pays), and
* api:  ``steer_image`` + ``preprocess`` + ``roi_patch_weights``/``attention_bias`` (attention mode) +
  ``encode_images`` from uint8 images and their masks,

alternating batch by batch, so that load from other processes hits both alike. Models are random-init (the
timing does not depend on the weights, and no pretrained weights can be downloaded here).

    nice -n 10 .venv/bin/python benchmarks/feature_speed.py --models ViT-B-32 ViT-B-16 --batch-size 8 --batches 3
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from medfocus.pipeline.encoders import (
    STEERING_MODES,
    attention_bias,
    create_encoder,
    roi_patch_weights,
    steer_image,
    steering_params,
)

MASK_SIZE = 256


@dataclass
class ModeTiming:
    model: str
    mode: str
    batch_size: int
    images: int
    bare_images_per_s: float
    api_images_per_s: float
    ratio: float
    median_pair_ratio: float
    steer_preprocess_ms_per_image: float
    encode_ms_per_image: float


def synthetic_sample(rng: np.random.Generator, height: int, width: int):
    """A smooth random image with an elliptical ROI (label 1) and a second mask (label 2) at store resolution."""
    coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = np.kron(coarse, np.ones((16, 16, 1), dtype=np.uint8))[:height, :width].copy()
    yy, xx = np.mgrid[:MASK_SIZE, :MASK_SIZE]
    cy, cx = rng.uniform(0.3, 0.7, size=2) * MASK_SIZE
    ry, rx = rng.uniform(0.1, 0.25, size=2) * MASK_SIZE
    roi = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    labels = roi.astype(np.uint16)
    labels[:40, :40] = 2
    return image, roi, labels


def bare_encoder(encoder):
    if encoder.family == "litemedsam":
        return encoder.model
    return encoder.model.encode_image


def time_bare(bare, pixels: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        bare(pixels)
    return time.perf_counter() - started


def api_batch(encoder, samples, mode: str, params: dict) -> tuple[float, float]:
    """Run one batch through the API; (steer+preprocess seconds, encode seconds)."""
    started = time.perf_counter()
    pixels = torch.stack([encoder.preprocess(steer_image(image, roi, labels, mode, **params))
                          for image, roi, labels in samples])
    bias = None
    if mode == "attention":
        weights = np.stack([roi_patch_weights(roi, encoder.grid, image.shape) for image, roi, _ in samples])
        bias = attention_bias(weights, params["strength"])
    prepared = time.perf_counter()
    encoder.encode_images(pixels, patch_bias=bias)
    return prepared - started, time.perf_counter() - prepared


def time_model(model: str, modes: list[str], batch_size: int, batches: int, image_shape: tuple[int, int],
               seed: int) -> tuple[list[ModeTiming], dict]:
    encoder = create_encoder(model, "none")
    rng = np.random.default_rng(seed)
    data = [[synthetic_sample(rng, *image_shape) for _ in range(batch_size)] for _ in range(batches)]
    bare_pixels = [torch.stack([encoder.preprocess(image) for image, _, _ in batch]) for batch in data]
    bare = bare_encoder(encoder)
    with torch.no_grad():
        bare(bare_pixels[0])  # warm-up: first-call allocations and kernel selection
    results = []
    for mode in modes:
        if mode == "attention" and encoder.family == "litemedsam":
            continue
        params = steering_params(mode)
        api_batch(encoder, data[0], mode, params)  # warm-up for this mode
        bare_seconds = prepare_seconds = encode_seconds = 0.0
        pair_ratios = []
        for index, (batch, pixels) in enumerate(zip(data, bare_pixels)):
            # Alternate which side goes first, so that neither always meets the other's cache or load spikes.
            if index % 2 == 0:
                bare_time = time_bare(bare, pixels)
                prepare, encode = api_batch(encoder, batch, mode, params)
            else:
                prepare, encode = api_batch(encoder, batch, mode, params)
                bare_time = time_bare(bare, pixels)
            bare_seconds += bare_time
            prepare_seconds += prepare
            encode_seconds += encode
            pair_ratios.append(bare_time / (prepare + encode))
        images = batch_size * batches
        api_seconds = prepare_seconds + encode_seconds
        results.append(ModeTiming(
            model=model, mode=mode, batch_size=batch_size, images=images,
            bare_images_per_s=images / bare_seconds, api_images_per_s=images / api_seconds,
            ratio=bare_seconds / api_seconds, median_pair_ratio=float(np.median(pair_ratios)),
            steer_preprocess_ms_per_image=1000 * prepare_seconds / images,
            encode_ms_per_image=1000 * encode_seconds / images,
        ))
        print(json.dumps(asdict(results[-1])), flush=True)
    global_embedding, tokens = encoder.encode_images(bare_pixels[0][:1])
    patches = encoder.grid[0] * encoder.grid[1]
    weights = np.zeros(patches, dtype=np.float16)
    sizes = {
        "model": model,
        "embed_dim": encoder.embed_dim,
        "num_patches": patches,
        "dtype": "float16",
        "global_bytes": global_embedding[0].half().numpy().nbytes,
        "tokens_bytes": tokens[0].half().numpy().nbytes,
        "patch_weights_bytes": weights.nbytes,
    }
    sizes["bytes_per_image"] = sizes["global_bytes"] + sizes["tokens_bytes"] + sizes["patch_weights_bytes"]
    print(json.dumps(sizes), flush=True)
    return results, sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument("--modes", nargs="+", default=list(STEERING_MODES), choices=STEERING_MODES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--image-height", type=int, default=512)
    parser.add_argument("--image-width", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    all_timings, all_sizes = [], []
    for model in args.models:
        timings, sizes = time_model(model, args.modes, args.batch_size, args.batches,
                                    (args.image_height, args.image_width), args.seed)
        all_timings += timings
        all_sizes.append(sizes)
    print(f"\nrandom-init weights, CPU, torch threads={args.threads}, batch size {args.batch_size}, "
          f"{args.batches} batches of {args.image_height}x{args.image_width} images, "
          f"wall {time.perf_counter() - started:.0f} s\n")
    print("| model | mode | bare encode_image img/s | API img/s | API / bare (totals) | API / bare (median of "
          "paired batches) | steer+preprocess ms/img | encode_images ms/img |")
    print("|---|---|---|---|---|---|---|---|")
    for t in all_timings:
        print(f"| {t.model} | {t.mode} | {t.bare_images_per_s:.2f} | {t.api_images_per_s:.2f} | {t.ratio:.2f} "
              f"| {t.median_pair_ratio:.2f} | {t.steer_preprocess_ms_per_image:.1f} | {t.encode_ms_per_image:.1f} |")
    print("\n| model | D | L | global B | tokens B | patch weights B | bytes/image (float16) |")
    print("|---|---|---|---|---|---|---|")
    for s in all_sizes:
        print(f"| {s['model']} | {s['embed_dim']} | {s['num_patches']} | {s['global_bytes']} | {s['tokens_bytes']} "
              f"| {s['patch_weights_bytes']} | {s['bytes_per_image']} |")


if __name__ == "__main__":
    main()
