"""Seconds per fit of the gated dual view (medfocus_dual) and of one fusion head (medfocus), on synthetic features shaped
like the demo's LiteMedSAM stores (D = 256, L = 16² tokens, 3 classes), one torch thread, the default TrainConfig.

Process CPU time is reported beside wall time: on a shared machine it is what the fit costs an idle core.

    OMP_NUM_THREADS=1 python benchmarks/dual_fit_speed.py --sizes 24 48 96 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

import medfocus.trainer as trainer
from medfocus.trainer import TrainConfig, fit, synthetic_task


def _commit() -> str:
    folder = Path(trainer.__path__[0])
    result = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 48, 96], help="training images per fit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warm, text = synthetic_task(12, embed_dim=256, num_patches=256, roi_patches=20, roi_view_signal=0.3)
    fit("medfocus_dual", warm, text, TrainConfig(epochs=2), seed=0)  # one-time imports (torch._dynamo via AdamW)
    results = {"trainer": str(Path(trainer.__path__[0])), "commit": _commit(), "fits": []}
    for size in args.sizes:
        train, text = synthetic_task(size, embed_dim=256, num_patches=256, roi_patches=20, signal=0.3, roi_view_signal=0.3)
        for method in ("medfocus_dual", "medfocus"):
            walls, cpus = [], []
            for _ in range(args.repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                fit(method, train, text, TrainConfig(), seed=0)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            row = {"method": method, "images": size, "wall_s": round(statistics.median(walls), 3),
                   "cpu_s": round(statistics.median(cpus), 3)}
            results["fits"].append(row)
            print(f"{method:14s} {size:4d} images: {row['wall_s']:.2f} s wall, {row['cpu_s']:.2f} s CPU (median of {args.repeats})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
