"""Near-copy detection in prepare: how its two thresholds behave on real datasets, and how synthetic copies score.

For each dataset given as NAME=ROOT (a registered name or any folder-per-class / train-test folder), every file is
decoded once (``inspect_files``), byte-identical files are collapsed (``collapse_duplicates``), and then
``find_near_duplicates`` is run for every (hash bound, minimum correlation) asked for: pairs, files removed, label
conflicts, train/test leaks. With ``--synthetic N`` it also takes N images per dataset (seeded), makes copies of
each (resized to half and saved as JPEG quality 60; brightness +5 %; 3 % cut off the top and left) and reports how
many hash bits and how much structure correlation separate each copy from its original.

    OMP_NUM_THREADS=1 python benchmarks/near_duplicates.py covid=../shared/datasets/covid \\
        breast_cancer=../shared/datasets/breast_ultrasound brain_tumor=../shared/datasets/brain_tumor --synthetic 40
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from medfocus.pipeline.config import parse_params
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.images import image_signature, load_image
from medfocus.pipeline.manifest import collapse_duplicates, discover, find_near_duplicates, inspect_files, match_classes


def _copies(image: np.ndarray) -> dict[str, np.ndarray]:
    height, width = image.shape[:2]
    half = Image.fromarray(image).resize((max(1, width // 2), max(1, height // 2)), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    half.save(buffer, "JPEG", quality=60)
    cut = int(0.03 * min(height, width))
    return {
        "half size, JPEG 60": np.asarray(Image.open(buffer).convert("RGB")),
        "brightness +5 %": np.clip(np.round(image.astype(np.float32) * 1.05), 0, 255).astype(np.uint8),
        "3 % cropped": np.ascontiguousarray(image[cut:, cut:]),
    }


def synthetic_copies(records, count: int, seed: int = 1) -> None:
    picked = np.random.default_rng(seed).choice(len(records), size=min(count, len(records)), replace=False)
    scores: dict[str, list[tuple[int, float]]] = {}
    for index in picked:
        image = load_image(records[index].file.path)
        original = records[index].signature
        for name, copy in _copies(image).items():
            signature = image_signature(copy)
            scores.setdefault(name, []).append((bin(original.phash ^ signature.phash).count("1"),
                                                float(original.structure @ signature.structure)))
    for name, values in scores.items():
        bits, correlation = np.array(values).T
        print(f"  copies '{name}' of {len(values)} images: hash bits {int(bits.min())}-{int(bits.max())}, "
              f"correlation {correlation.min():.4f}-{correlation.max():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", help="NAME=ROOT, e.g. brain_tumor=../shared/datasets/brain_tumor")
    parser.add_argument("--hash-bits", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--min-correlation", type=float, nargs="+", default=[0.90, 0.93, 0.95, 0.96, 0.97, 0.98])
    parser.add_argument("--synthetic", type=int, default=0, help="images per dataset to make synthetic copies of")
    args = parser.parse_args()
    params = parse_params({})
    for item in args.datasets:
        name, _, root = item.partition("=")
        if not root:
            parser.error(f"{item!r}: give NAME=ROOT")
        spec = resolve_dataset(name, Path(root), params)
        _, found, files_per_folder = discover(spec)
        spec, mapping = match_classes(spec, sorted(files_per_folder))
        readable, corrupt = inspect_files(found)
        records, _ = collapse_duplicates(readable, mapping)
        print(f"{name}: {len(found)} files, {len(corrupt)} unreadable, {len(records)} after byte-identical duplicates")
        for bits in args.hash_bits:
            cells = []
            for minimum in args.min_correlation:
                _, report = find_near_duplicates(records, mapping, bits, minimum)
                cells.append(f"{minimum:g}: {report['near_duplicate_pairs']} pairs / {report['near_duplicate_files_removed']} removed"
                             f" / {report['near_duplicate_label_conflicts']} conflicts / {report['near_duplicate_leaks']} leaks")
            print(f"  hash <= {bits} bits | " + " | ".join(cells))
        if args.synthetic:
            synthetic_copies(records, args.synthetic)


if __name__ == "__main__":
    main()
