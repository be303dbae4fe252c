"""ROI quality: Dice/IoU of each ROI policy's chosen mask against the BUSI lesion masks.

Protocol: the images of ../shared/datasets/breast_ultrasound are split once into two class-stratified
halves with a fixed seed (``split_tune_report``, seed 0). Policies were designed and their weights set on
the *tune* half only; numbers to quote come from the *report* half. ``normal`` images (empty ground truth)
are split the same way and reported apart: for them an empty ROI scores 1, any ROI 0.

Frame: ROIs are at the store resolution (256²); ground-truth masks are resized to it (nearest) and
binarised (> 0). Seconds are wall-clock per ``segment()`` call and process CPU seconds (all torch threads).

    nice -n 10 python benchmarks/roi_quality.py --split report --policies whole-image centre-box dark-blob

``--fit-weights POLICY`` instead sets that policy's score weights on the tune half (see
``medfocus.pipeline.segmenters.policy_fit``, which ``medfocus roi-fit`` runs): it prints the 5-fold cross-validated
Dice on the tune half and the weights fitted on all of it, for a policy file (the built-in ones are
``pipeline/segmenters/builtin_policies/*.json``; ``medfocus roi-fit`` writes a whole file with its held-out scores).

    nice -n 10 python benchmarks/roi_quality.py --fit-weights dark-blob --threads 1

The demo's numbered images are split by number instead (tune: 0-19 of each class, report: 20-39):

    python benchmarks/roi_quality.py --images data/demo --masks data/demo/lesion_masks --tune-below 20 \
        --fit-weights demo-lesion
    python benchmarks/roi_quality.py --images data/demo --masks data/demo/lesion_masks --tune-below 20 \
        --split report --policies grid-score dark-blob demo-lesion
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from medfocus.pipeline.segmenters import create_segmenter, evaluate_roi, get_policy, split_tune_report
from medfocus.pipeline.segmenters.policies import POLICIES
from medfocus.pipeline.segmenters.policy_fit import collect_pools, cross_validate, fit_weights
from medfocus.pipeline.segmenters.roi_eval import GroundTruth, list_class_images

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def markdown_table(reports: dict[str, dict]) -> str:
    lines = [
        "| policy | lesion images | Dice benign | Dice malignant | **Dice lesion** | IoU lesion | median Dice "
        "| normal: empty ROI | s/image | CPU s/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, report in reports.items():
        per_class = report["per_class"]
        normal = report["empty_gt"]
        empty_rate = "-" if normal["n"] == 0 else f"{normal['dice']:.2f} (n={normal['n']})"
        lines.append(
            f"| {name} | {report['lesion']['n']} | {per_class.get('benign', {}).get('dice', float('nan')):.3f} "
            f"| {per_class.get('malignant', {}).get('dice', float('nan')):.3f} | **{report['lesion']['dice']:.3f}** "
            f"| {report['lesion']['iou']:.3f} | {report['lesion']['dice_median']:.3f} | {empty_rate} "
            f"| {report['overall']['seconds_per_image']:.2f} | {report['overall']['cpu_seconds_per_image']:.2f} |"
        )
    return "\n".join(lines)


def fit_policy_weights(args: argparse.Namespace, tune: list, options: dict) -> int:
    policy = get_policy(args.fit_weights)
    segmenter = create_segmenter(args.backend, policy=policy.name, **options)
    started = time.time()
    items = [item for item in tune if item[1] != "normal"][: args.limit]
    pools = collect_pools(segmenter, policy, items, args.images, GroundTruth(args.masks, args.mask_suffix),
                          refine=policy.refine_steps > 0, progress=True)
    report = cross_validate(pools, policy)
    weights = fit_weights(pools, policy)
    print(f"\n{policy.name}: {len(pools)} tune images, {time.time() - started:.0f} s; 5-fold CV Dice "
          f"{report['cv_score']:.3f} (best candidate in the pool: {report['oracle_score']:.3f})")
    print("weights=" + json.dumps(weights, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"policy": policy.name, "weights": weights, **report}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=SHARED / "breast_ultrasound")
    parser.add_argument("--masks", type=Path, default=SHARED / "breast_ultrasound_masks")
    parser.add_argument("--mask-suffix", default="_mask.png")
    parser.add_argument("--split", choices=("tune", "report", "all"), default="report")
    parser.add_argument("--seed", type=int, default=0, help="split seed (0 is the fixed split everything is quoted on)")
    parser.add_argument("--policies", nargs="+", default=sorted(POLICIES))
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra create_segmenter option, e.g. mode=prompted (values parsed as JSON when they can be)")
    parser.add_argument("--include-normal", action="store_true", help="also score the normal (empty mask) images")
    parser.add_argument("--limit", type=int, default=None, help="first N images of the split (smoke tests only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON with every per-image number")
    parser.add_argument("--tune-below", type=int, default=None, metavar="N",
                        help="tune half = images whose file name ends in a number below N (the demo's), report = the rest")
    parser.add_argument("--fit-weights", metavar="POLICY", default=None,
                        help="fit this policy's score weights on the tune half instead of evaluating")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.images.is_dir() or not args.masks.is_dir():
        raise SystemExit(f"need {args.images} and {args.masks} (the shared BUSI copy)")
    items = [item for item in list_class_images(args.images) if args.masks.resolve() not in (item[0].resolve().parents)]
    if not args.include_normal:
        items = [item for item in items if item[1] != "normal"]
    if args.tune_below is None:
        tune, report = split_tune_report(items, seed=args.seed)
    else:
        numbered = [(item, re.search(r"(\d+)$", item[0].stem)) for item in items]
        if not all(match for _, match in numbered):
            raise SystemExit("--tune-below needs image file names that end in a number")
        tune = [item for item, match in numbered if int(match.group(1)) < args.tune_below]
        report = [item for item, match in numbered if int(match.group(1)) >= args.tune_below]
    chosen = {"tune": tune, "report": report, "all": tune + report}[args.split]
    if args.limit:
        chosen = chosen[: args.limit]
    options = {}
    for pair in args.backend_option:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value

    if args.fit_weights:
        return fit_policy_weights(args, tune, options)

    reports = {}
    started = time.time()
    for policy in args.policies:
        segmenter = create_segmenter(args.backend, policy=policy, **options)
        reports[policy] = evaluate_roi(segmenter, chosen, args.masks, args.mask_suffix, images_root=args.images)
        lesion = reports[policy]["lesion"]
        print(f"[{policy}] lesion Dice {lesion['dice']:.3f} over {lesion['n']} images, "
              f"{reports[policy]['overall']['seconds_per_image']:.2f} s/image", flush=True)
    print(f"\nsplit: {args.split} half (seed {args.seed}), {len(chosen)} images, backend {args.backend}, "
          f"torch threads {torch.get_num_threads()}, {time.time() - started:.0f} s in all\n")
    print(markdown_table(reports))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "split": args.split,
                   "seed": args.seed, "reports": reports}
        args.out.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
