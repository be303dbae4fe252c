"""Could a learned scorer on an encoder's feature-map cells find the brain tumour better than `brain-mri`?

A probe for issue 23 item 3 (box IoU 0.60 / hit rate 0.90 on held-out brain_tumor_boxes slices; `brain-mri` reaches
0.379 / 0.49). Each slice's feature map is taken from ``--encoder``: Lite2's last one (9x9 cells at 260²) or
LiteMedSAM's image embedding (64x64 cells at 256², the map the segmenter decodes its masks from, so at segment time it
costs nothing more); a cell is "tumour" when at least half of it lies inside the ground-truth box; a logistic
regression on the L2-normalised cells is fitted on the tune part of `roi-fit`'s split of `brain-mri.json` (blocks of
20 file numbers, hold-out fraction 0.4, seed 0: 200 / 160 slices) and scored on the held-out part. The proposal: the
cells connected to the best cell whose probability is at least ``rel`` times the best one's; scored as `roi-eval`
scores an ROI (box IoU of its bounding box; hit = the region covers at least half of the ground-truth box), per weight
decay and ``rel``. No LiteMedSAM decoding: the box itself is the proposal. The cell labels and the region growth are
the product's (``pipeline/segmenters/embedding_map.py``, which this probe led to; the probe's own copies, used for the
results files, gave the same arrays on 200 random maps and boxes).

    OMP_NUM_THREADS=2 python benchmarks/roi_cell_scorer.py --root ../shared/datasets/brain_tumor_boxes \\
        --out benchmarks/results/roi_cell_scorer.json
    OMP_NUM_THREADS=2 python benchmarks/roi_cell_scorer.py --root ../shared/datasets/brain_tumor_boxes \\
        --encoder litemedsam --out benchmarks/results/roi_cell_scorer_litemedsam.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from medfocus.pipeline.encoders.efficientnet import EfficientNetLiteEncoder
from medfocus.pipeline.images import load_image
from medfocus.pipeline.segmenters.embedding_map import cell_targets, grown_region
from medfocus.pipeline.segmenters.litemedsam import LiteMedSAMSegmenter
from medfocus.pipeline.segmenters.policy_fit import holdout_split
from medfocus.pipeline.segmenters.roi_eval import box_scores, read_yolo_boxes, union_box


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="brain_tumor_boxes (images/, boxes/)")
    parser.add_argument("--encoder", choices=("lite2", "litemedsam"), default="lite2")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    images = args.root / "images"
    items = [(path, path.parent.name) for path in sorted(images.glob("*/*.jpg"))]
    tune, held, _ = holdout_split(items, images, group_by="number:20", holdout_fraction=0.4, seed=0)
    if args.encoder == "lite2":
        encoder = EfficientNetLiteEncoder("efficientnet_lite2")
        grid = encoder.grid[0]
        encode = lambda image: encoder.encode_images(encoder.preprocess(image)[None])[1][0]  # noqa: E731
    else:  # the slices are square: the 64x64 embedding covers the whole image, no padding
        segmenter = LiteMedSAMSegmenter(policy="whole-image")
        grid = 64
        encode = lambda image: segmenter.embed(image).embedding[0].flatten(1).T  # noqa: E731

    def cells(part):
        tokens = np.stack([encode(load_image(path)).float().numpy() for path, _ in part])
        return tokens / np.linalg.norm(tokens, axis=2, keepdims=True)

    def boxes(part):
        return [union_box(read_yolo_boxes(args.root / "boxes" / path.parent.name / f"{path.stem}.txt")) for path, _ in part]

    tune_cells, held_cells = cells(tune), cells(held)
    tune_boxes, held_boxes = boxes(tune), boxes(held)
    x = torch.tensor(tune_cells.reshape(-1, tune_cells.shape[2]))
    y = torch.tensor(np.concatenate([cell_targets(box, grid, grid) for box in tune_boxes]))
    held_classes = np.array([label for _, label in held])
    report = {"command": "python benchmarks/roi_cell_scorer.py " + " ".join(os.sys.argv[1:]),
              "encoder": args.encoder, "tune": len(tune), "held_out": len(held), "grid": grid, "rows": []}
    for weight_decay in (1e-4, 1e-3, 1e-2):
        weight = torch.zeros(x.shape[1], requires_grad=True)
        bias = torch.zeros(1, requires_grad=True)
        optimiser = torch.optim.LBFGS([weight, bias], max_iter=300, line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(30 * (x @ weight) + bias, y)
                    + weight_decay * (weight ** 2).sum())
            loss.backward()
            return loss

        optimiser.step(closure)
        logits = 30 * (torch.tensor(held_cells) @ weight.detach()) + bias.detach()
        probability = torch.sigmoid(logits).numpy().reshape(len(held), grid, grid)
        for rel in (0.3, 0.5, 0.7):
            scored = [box_scores(grown_region(p, rel), truth) for p, truth in zip(probability, held_boxes)]
            iou = np.array([s["box_iou"] for s in scored])
            hit = np.array([s["box_hit"] for s in scored])
            row = {"weight_decay": weight_decay, "rel": rel, "box_iou": float(iou.mean()), "hit_rate": float(hit.mean()),
                   "box_iou_per_class": {c: float(iou[held_classes == c].mean()) for c in sorted(set(held_classes))}}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
