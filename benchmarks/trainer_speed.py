"""Speed of the trainer on cached features (synthetic, shaped like COVID with ViT-B-32: D=512, L=49 patches).

Measures
  1. one medfocus fit on 12 images / 3 classes (≈ 5% of COVID's 251 training images), cold (first fit in the
     process) and warm (median of repeats);
  2. the protocol: 5 fractions × 5 seeds × every method (medfocus_dual on a synthetic ROI view) on a 251-image training pool (COVID's 111/70/70) with a
     66-image test set (26/20/20): fit, predict, metrics, then aggregate and the accuracy-vs-fraction plot;
  3. the naive way: re-encoding the training images with a random-init open_clip ViT-B-32 every epoch (batch 32,
     forward only, no preprocessing: a lower bound on its cost) against one epoch of the head on cached tensors.

Every timing is given as wall-clock and as process CPU time: on a shared machine the wall clock of a niced process
says more about the neighbours than about the code, while the CPU time of a one-thread run is what it would take alone.
Synthetic features and a random-init encoder: these are timings, not accuracies.

    nice -n 10 .venv/bin/python -u benchmarks/trainer_speed.py --threads 1 --encoder-threads 2 --json /tmp/trainer_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medfocus.trainer import METHODS, FeatureSet, TrainConfig, aggregate, compute_metrics, fit, plot_accuracy_vs_fraction, synthetic_task
from medfocus.trainer.heads import FusionHead, HeadInputs
from medfocus.trainer.losses import medfocus_loss

EMBED_DIM, NUM_PATCHES = 512, 49
TRAIN_COUNTS, TEST_COUNTS = (111, 70, 70), (26, 20, 20)  # COVID train / test per class
FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)
SEEDS = (0, 1, 2, 3, 4)


class Stopwatch:
    """Wall-clock and process CPU seconds of a ``with`` block."""

    def __enter__(self) -> "Stopwatch":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall, "cpu_s": self.cpu}


def covid_like_pool() -> tuple[FeatureSet, FeatureSet, object]:
    """A 251-image training pool and a 66-image test set with COVID's class sizes."""
    total = 3 * max(n_train + n_test for n_train, n_test in zip(TRAIN_COUNTS, TEST_COUNTS))  # labels cycle over classes
    pool, text = synthetic_task(total, num_classes=3, embed_dim=EMBED_DIM, num_patches=NUM_PATCHES, roi_patches=8,
                                signal=0.3, templates=7, seed=0, roi_view_signal=0.3)
    train_idx, test_idx = [], []
    for cls, (n_train, n_test) in enumerate(zip(TRAIN_COUNTS, TEST_COUNTS)):
        members = (pool.labels == cls).nonzero().flatten().tolist()
        train_idx += members[:n_train]
        test_idx += members[n_train:n_train + n_test]
    return pool.subset(train_idx), pool.subset(test_idx), text


def fraction_subset(train: FeatureSet, fraction: float, seed: int) -> FeatureSet:
    """Stratified: max(1, round(fraction · n_c)) images of each class, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in range(int(train.labels.max()) + 1):
        members = (train.labels == cls).nonzero().flatten()
        take = max(1, round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return train.subset(torch.cat(chosen).sort().values)


def twelve_images(train: FeatureSet) -> FeatureSet:
    return train.subset(torch.cat([(train.labels == c).nonzero().flatten()[:4] for c in range(3)]))


def time_single_fit(subset: FeatureSet, text, config: TrainConfig, repeats: int) -> dict:
    with Stopwatch() as cold:
        fit("medfocus", subset, text, config, seed=0)
    warm = []
    for seed in range(repeats):
        with Stopwatch() as watch:
            fit("medfocus", subset, text, config, seed=seed)
        warm.append(watch)
    return {
        "n_images": len(subset), "cold": cold.as_dict(),
        "warm_median": {"wall_s": statistics.median(w.wall for w in warm), "cpu_s": statistics.median(w.cpu for w in warm)},
    }


def time_protocol(train: FeatureSet, test: FeatureSet, text, config: TrainConfig, plot_dir: Path) -> dict:
    per_method = {method: {"wall_s": 0.0, "cpu_s": 0.0} for method in METHODS}
    runs = []
    with Stopwatch() as total:
        for fraction in FRACTIONS:
            for seed in SEEDS:
                subset = fraction_subset(train, fraction, seed)
                for method in METHODS:
                    with Stopwatch() as watch:
                        model = fit(method, subset, text, config, seed=seed)
                        metrics = compute_metrics(test.labels, model.predict_proba(test), text.class_names)
                    per_method[method]["wall_s"] += watch.wall
                    per_method[method]["cpu_s"] += watch.cpu
                    runs.append({"method": method, "mode": "attention", "fraction": fraction, "shots": None, "seed": seed,
                                 "weights_source": "synthetic", **metrics})
        aggregated = aggregate(runs)
        plot_accuracy_vs_fraction(aggregated, plot_dir / "accuracy_vs_fraction.png", "synthetic COVID-shaped protocol", "synthetic",
                                  random_init=False)
    return {"runs": len(runs), "total": total.as_dict(), "per_method": per_method}


def time_cached_epoch(subset: FeatureSet, text, config: TrainConfig, repeats: int) -> dict:
    """One full-batch medfocus epoch (forward, loss, backward, AdamW step) on cached tensors; median of ``repeats``."""
    inputs = HeadInputs.from_features(subset, with_patches=True)
    head = FusionHead(
        EMBED_DIM, 3, heads=config.attention_heads, head_dim=config.head_dim, roi_bias_strength=config.roi_bias_strength,
        learn_roi_bias=config.learn_roi_bias, logit_scale=1.0 / config.temperature, learn_logit_scale=config.learn_temperature,
        num_patches=NUM_PATCHES,
    )
    head.initialise(text.class_means(), torch.Generator().manual_seed(0))
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr, fused=True)
    timings = []
    for _ in range(repeats + 1):
        with Stopwatch() as watch:
            loss, _ = medfocus_loss(head(inputs), subset.labels, config.lambda_)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        timings.append(watch)
    return {"wall_s": statistics.median(w.wall for w in timings[1:]), "cpu_s": statistics.median(w.cpu for w in timings[1:])}


def time_naive_epoch(num_images: int, batch_size: int, threads: int) -> dict:
    """Re-encoding ``num_images`` with a random-init ViT-B-32 (global embedding + 512-d patch tokens), forward only."""
    import open_clip

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    visual = model.visual.eval()
    visual.output_tokens = True
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        visual(torch.randn(2, 3, 224, 224, generator=generator))  # first-call allocation outside the timing
        with Stopwatch() as watch:
            for start in range(0, num_images, batch_size):
                images = torch.randn(min(batch_size, num_images - start), 3, 224, 224, generator=generator)
                pooled, tokens = visual(images)
                patch_tokens = tokens @ visual.proj
                assert patch_tokens.shape[1:] == (NUM_PATCHES, EMBED_DIM) and pooled.shape[1] == EMBED_DIM
    torch.set_num_threads(previous)
    return {"n_images": num_images, "batch_size": batch_size, "threads": threads, **watch.as_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the trainer")
    parser.add_argument("--encoder-threads", type=int, default=2, help="torch CPU threads for the naive re-encoding")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-naive", action="store_true", help="skip the open_clip re-encoding comparison")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig()
    train, test, text = covid_like_pool()
    results: dict = {
        "threads": args.threads, "encoder_threads": args.encoder_threads, "torch": str(torch.__version__),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average_at_start": os.getloadavg(),
        "config": config.model_dump(by_alias=True),
    }

    single = results["single_fit"] = time_single_fit(twelve_images(train), text, config, args.repeats)
    print(f"medfocus fit, {single['n_images']} images, D={EMBED_DIM}, L={NUM_PATCHES}, {config.epochs} epochs, {args.threads} thread(s): "
          f"cold {single['cold']['wall_s']:.2f} s wall / {single['cold']['cpu_s']:.2f} s CPU, "
          f"warm median {single['warm_median']['wall_s']:.2f} s wall / {single['warm_median']['cpu_s']:.2f} s CPU")

    with tempfile.TemporaryDirectory() as plot_dir:
        protocol = results["protocol"] = time_protocol(train, test, text, config, Path(plot_dir))
    print(f"protocol {len(FRACTIONS)} fractions × {len(SEEDS)} seeds × {len(METHODS)} methods = {protocol['runs']} runs "
          f"on {len(train)} train / {len(test)} test: {protocol['total']['wall_s']:.1f} s wall / {protocol['total']['cpu_s']:.1f} s CPU")
    for method, seconds in protocol["per_method"].items():
        print(f"  {method:14s} {seconds['wall_s']:7.2f} s wall {seconds['cpu_s']:7.2f} s CPU")

    if not args.skip_naive:
        comparison = results["naive_comparison"] = {}
        for name, subset in (("12 images (5%)", twelve_images(train)), ("251 images (100%)", train)):
            cached = time_cached_epoch(subset, text, config, args.repeats)
            encode = time_naive_epoch(len(subset), batch_size=32, threads=args.encoder_threads)
            row = {"cached_epoch": cached, "encode_epoch": encode}
            for clock in ("wall_s", "cpu_s"):
                naive_epoch = encode[clock] + cached[clock]  # the naive epoch still trains the same head
                row[f"ratio_{clock[:-2]}"] = naive_epoch / cached[clock]
                row[f"naive_fit_{clock}"] = config.epochs * naive_epoch
                row[f"cached_fit_{clock}"] = config.epochs * cached[clock]
            comparison[name] = row
            print(f"{name}: cached epoch {1000 * cached['wall_s']:.1f} ms wall / {1000 * cached['cpu_s']:.1f} ms CPU; "
                  f"re-encoding {encode['wall_s']:.2f} s wall / {encode['cpu_s']:.2f} s CPU ({args.encoder_threads} threads) "
                  f"→ naive/cached per epoch ×{row['ratio_wall']:.0f} wall, ×{row['ratio_cpu']:.0f} CPU; "
                  f"{config.epochs} epochs: {row['naive_fit_wall_s']:.0f} s vs {row['cached_fit_wall_s']:.2f} s wall")

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
