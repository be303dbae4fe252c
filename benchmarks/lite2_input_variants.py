"""EfficientNet-Lite2 input variants on brain_tumor and its external set: does a larger input, a flip average or a crop
to the head move the internal or the external accuracy?

A question-sized probe, not the protocol: for each variant, Lite2's global embedding (the pooled last feature map) of
every prepared brain_tumor image and every kept Br35H image, then an L2-regularised logistic regression (embeddings
L2-normalised, then standardised on the training subset) on the protocol's training subsets (the prepare stage's
``splits.json``: fractions 5 / 10 / 20 / 100 %, seeds 0-4) scored on the internal test split and on Br35H through
the class map (tumour = 1 − p(no_tumor)). It reads a cache folder the protocol made (``wave_protocol.sh``:
``segment-brain_tumor``, with ``evaluate.external`` of ``wave_protocol.yaml``):

    OMP_NUM_THREADS=2 python benchmarks/lite2_input_variants.py --cache /work/wavecache/run \\
        --root ../shared/datasets/brain_tumor/train --external ../shared/datasets/brain_mri_external/images \\
        --embeddings /tmp/lite2_variants --out benchmarks/results/lite2_input_variants.json

Variants: ``260`` (the pretrained input size, what the feature stage uses), ``384``, ``260-head`` (each image cropped to
the bounding box of the pixels brighter than 10 % of its 99th percentile, i.e. the head, before the letterbox: the
sources frame the head differently), each with and without the flip average (mean of the image's and its mirror's
embeddings). Embeddings are cached per variant in ``--embeddings`` (encoding is the slow part: ≈ 0.1 s per image and
pass at 260², 0.2 s at 384², two threads).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from medfocus.pipeline.encoders.efficientnet import EfficientNetLiteEncoder
from medfocus.pipeline.images import load_image

VARIANTS = {"260": (260, None), "384": (384, None), "260-head": (260, "head"), "260-equalize": (260, "equalize"),
            "260-stretch": (260, "stretch")}
FRACTIONS = ("0.05", "0.1", "0.2", "1")


def head_pixels(gray: np.ndarray) -> np.ndarray:
    """The pixels brighter than 10 % of the 99th percentile: the head, not the air around it."""
    return gray > 0.1 * np.percentile(gray, 99)


def head_crop(image: np.ndarray) -> np.ndarray:
    gray = image.mean(2) if image.ndim == 3 else image
    ys, xs = np.where(head_pixels(gray))
    if len(ys) < 100:
        return image
    return image[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def equalize(image: np.ndarray) -> np.ndarray:
    """Histogram equalisation over the head's pixels (the air stays black): every source gets the same grey levels."""
    gray = image.mean(2) if image.ndim == 3 else image.astype(np.float64)
    head = head_pixels(gray)
    if head.sum() < 100:
        return image
    levels = np.sort(gray[head])
    out = np.where(head, np.searchsorted(levels, gray, side="right") / len(levels) * 255, 0)
    return np.repeat(out[..., None], 3, 2).astype(np.uint8)


def stretch(image: np.ndarray) -> np.ndarray:
    """The head's 1st-99th percentile of grey stretched to 0-255: contrast and brightness made alike across sources."""
    gray = image.mean(2) if image.ndim == 3 else image.astype(np.float64)
    head = head_pixels(gray)
    if head.sum() < 100:
        return image
    low, high = np.percentile(gray[head], [1, 99])
    out = np.clip((gray - low) / max(high - low, 1e-6), 0, 1) * 255
    return np.repeat(out[..., None], 3, 2).astype(np.uint8)


TRANSFORMS = {None: lambda image: image, "head": head_crop, "equalize": equalize, "stretch": stretch}


def embed(variant: str, files: list[tuple[str, Path]], cache: Path) -> dict[str, np.ndarray]:
    """{hashes, plain, flipped} for one variant, computed once."""
    target = cache / f"lite2_{variant}.npz"
    if target.exists():
        return dict(np.load(target))
    size, transform = VARIANTS[variant]
    encoder = EfficientNetLiteEncoder("efficientnet_lite2")
    encoder.image_size = size  # the network is fully convolutional: a larger input gives a larger last feature map
    plain, flipped, start = [], [], time.time()
    for begin in range(0, len(files), 32):
        images = [load_image(path) for _, path in files[begin:begin + 32]]
        batch = torch.stack([encoder.preprocess(TRANSFORMS[transform](image)) for image in images])
        plain.append(encoder.encode_images(batch)[0].float().numpy())
        flipped.append(encoder.encode_images(batch.flip(-1))[0].float().numpy())
    result = {"hashes": np.array([digest for digest, _ in files]), "plain": np.concatenate(plain),
              "flipped": np.concatenate(flipped), "seconds": np.array(time.time() - start)}
    np.savez(target, **result)
    return result


def fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, weight_decay: float = 1e-3):
    xs, ys = torch.tensor(x), torch.tensor(y)
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ weight + bias, ys) + weight_decay * (weight ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return lambda z: torch.softmax(torch.tensor(z) @ weight.detach() + bias.detach(), 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="the protocol's cache folder")
    parser.add_argument("--root", type=Path, required=True, help="brain_tumor's images (the prepare root)")
    parser.add_argument("--external", type=Path, required=True, help="Br35H's images")
    parser.add_argument("--embeddings", type=Path, required=True, help="where each variant's embeddings are cached")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    args.embeddings.mkdir(parents=True, exist_ok=True)

    run = args.cache / "brain_tumor"
    manifest = list(csv.DictReader(open(run / "manifest.csv")))
    external = list(csv.DictReader(open(run / "external" / "br35h" / "manifest.csv")))
    classes = sorted({row["label"] for row in manifest})
    no_tumor = classes.index("no_tumor")
    label = {row["hash"]: classes.index(row["label"]) for row in manifest}
    test = [row["hash"] for row in manifest if row["split"] == "test"]
    external_hashes = [row["hash"] for row in external]
    external_tumor = np.array([row["label"] == "tumor" for row in external])
    subsets = json.load(open(run / "splits.json"))["fraction"]
    files = [(row["hash"], args.root / row["path"]) for row in manifest]
    files += [(row["hash"], args.external / row["path"]) for row in external]

    report = {"command": "python benchmarks/lite2_input_variants.py " + " ".join(os.sys.argv[1:]), "variants": {}}
    for variant in args.variants:
        embeddings = embed(variant, files, args.embeddings)
        row_of = {digest: index for index, digest in enumerate(embeddings["hashes"])}
        for flip in (False, True):
            values = (embeddings["plain"] + embeddings["flipped"]) / 2 if flip else embeddings["plain"]
            values = values / np.linalg.norm(values, axis=1, keepdims=True)
            pick = lambda hashes: values[[row_of[digest] for digest in hashes]]  # noqa: E731
            scores = {}
            for fraction in FRACTIONS:
                internal, outside = [], []
                for seed, train in sorted(subsets[fraction].items()):
                    x = pick(train)
                    mean, std = x.mean(0), x.std(0) + 1e-6
                    predict = fit_logistic(((x - mean) / std).astype(np.float32), np.array([label[d] for d in train]),
                                           len(classes))
                    p_test = predict(((pick(test) - mean) / std).astype(np.float32))
                    internal.append(float((p_test.argmax(1) == np.array([label[d] for d in test])).mean()))
                    p_external = predict(((pick(external_hashes) - mean) / std).astype(np.float32))
                    outside.append(float(((1 - p_external[:, no_tumor] > 0.5) == external_tumor).mean()))
                scores[fraction] = {"internal": 100 * np.mean(internal), "internal_sd": 100 * np.std(internal),
                                    "external": 100 * np.mean(outside), "external_sd": 100 * np.std(outside),
                                    "seeds": len(internal)}
            name = f"{variant}{' flip' if flip else ''}"
            report["variants"][name] = {"encode_seconds": float(embeddings["seconds"]), "scores": scores}
            print(name, " | ".join(f"{f}: {s['internal']:.1f} / Br35H {s['external']:.1f}" for f, s in scores.items()),
                  flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
