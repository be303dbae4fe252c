"""Box-prompt decoding on CPU: one LiteMedSAM decoder call per prompt against one call for all of them.

An ROI policy decodes a dozen or more box prompts per image on one image embedding (``RoiPolicy.decode``).
This times ``RoiPolicy.decode`` with ``decode_batch`` set to each value asked for, on the same embeddings and
the same prompts (a policy's own first-round proposals), alternating the settings so that load changes on a
shared machine hit all of them alike, and checks that every setting gives the same masks (logits within
``--tolerance``, masks thresholded at 0 identical up to a few boundary pixels).

Images: the first ``--images`` demo images (rendered in memory, all three classes), or image files given with
``--files``. Encoding is done once per image and not timed.

    python benchmarks/decode_batch.py --policy demo-lesion --batches 1 4 16 --images 4 --repeats 3 --threads 1 \\
        --out benchmarks/results/decode_batch.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medfocus.pipeline.demo import DEMO_CLASSES, render_demo_sample
from medfocus.pipeline.images import load_image
from medfocus.pipeline.segmenters import create_segmenter, get_policy
from medfocus.pipeline.segmenters.selection import decode, grayscale_work_image, proposals


def demo_images(count: int) -> list[np.ndarray]:
    images = []
    for index in range(count):
        sample = render_demo_sample(index % len(DEMO_CLASSES), index // len(DEMO_CLASSES))
        images.append(np.repeat(sample.image[:, :, None], 3, axis=2))
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="dark-blob", help="whose first-round proposals are decoded")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16],
                        help="decode_batch values to compare (prompts per decoder call)")
    parser.add_argument("--images", type=int, default=6, help="demo images to use (ignored with --files)")
    parser.add_argument("--files", type=Path, nargs="*", default=None, help="image files instead of demo images")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest logit difference accepted")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    images = [load_image(path) for path in args.files] if args.files else demo_images(args.images)
    policy = get_policy(args.policy)
    segmenter = create_segmenter("litemedsam", policy=policy.name)
    work = []
    for image in images:
        gray = grayscale_work_image(image)
        embedded = segmenter.embed(image)
        work.append((embedded, proposals(policy, gray, embedded)))
    prompts_per_image = [len(prompts) for _, prompts in work]

    seconds: dict[int, list[float]] = {batch: [] for batch in args.batches}
    reference: list[torch.Tensor] | None = None
    largest_difference, differing_pixels = 0.0, 0
    for repeat in range(args.repeats):
        for batch in args.batches:
            setting = dataclasses.replace(policy, decode_batch=batch)
            started = time.perf_counter()
            decoded = [decode(setting, embedded, prompts) for embedded, prompts in work]
            seconds[batch].append(time.perf_counter() - started)
            logits = [torch.stack([candidate.logits for candidate in candidates]) for candidates in decoded]
            if reference is None:
                reference = logits
                continue
            for ours, theirs in zip(logits, reference):
                largest_difference = max(largest_difference, float((ours - theirs).abs().max()))
                differing_pixels = max(differing_pixels, int(((ours > 0) != (theirs > 0)).sum()))

    total_prompts = sum(prompts_per_image)
    rows = {}
    for batch in args.batches:
        best, median = min(seconds[batch]), float(np.median(seconds[batch]))
        rows[str(batch)] = {
            "label": f"{batch} per call",
            "seconds_per_image_median": median / len(work),
            "ms_per_prompt_median": 1000 * median / total_prompts,
            "ms_per_prompt_best": 1000 * best / total_prompts,
        }
    baseline = rows[str(args.batches[0])]["ms_per_prompt_median"]
    print(f"{len(work)} images, {total_prompts} prompts ({args.policy} proposals: {min(prompts_per_image)}-"
          f"{max(prompts_per_image)} per image), {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    print("| decode_batch | ms/prompt (median) | ms/prompt (best) | s/image | speed vs first |")
    print("|---|---|---|---|---|")
    for batch, row in rows.items():
        print(f"| {row['label']} | {row['ms_per_prompt_median']:.1f} | {row['ms_per_prompt_best']:.1f} "
              f"| {row['seconds_per_image_median']:.3f} | {baseline / row['ms_per_prompt_median']:.2f}x |")
    same = largest_difference <= args.tolerance
    print(f"largest logit difference between settings {largest_difference:.2e} (tolerance {args.tolerance:g}); "
          f"most mask pixels that differ in one image {differing_pixels}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
            "policy": args.policy, "images": len(work), "prompts": total_prompts, "repeats": args.repeats,
            "settings": rows, "largest_logit_difference": largest_difference,
            "most_differing_mask_pixels": differing_pixels,
        }
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
