"""The evaluate stage: the paper's protocol (methods × ROI modes × training fractions or k shots × seeds) on cached features.

Every method sees the same subsets, the same features and the same test set; hyperparameters are chosen inside the
training subset (see medfocus.trainer). Outputs under ``cache/<dataset>/``: ``metrics.json`` (means ± std over seeds,
the encoder's weights source on every row), ``evaluation/runs.csv`` (one row per run), ``evaluation/*.png`` plots and
``evaluation/accuracy_vs_fraction.csv`` (for ``dvc plots``).
"""

from __future__ import annotations

import csv
import io
import logging
import time

from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.manifest import write_atomic, write_json
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.provenance import RANDOM_INIT, is_random_init, package_versions
from medfocus.trainer import MethodUnavailableError, aggregate, compute_metrics, fit, write_runs_csv
from medfocus.trainer.plots import plot_accuracy_vs_fraction, plot_confusion_matrix

from .common import load_prepared
from .train import current_feature_store, load_cached_features, subset_hashes

log = logging.getLogger(__name__)

# MedFocusCLIP (Arora & Namboodiri), test accuracy (%) after training on 5% of the training images.
PAPER_RESULTS_AT_5_PERCENT = {
    "covid": {"medfocusclip": 71.15, "clip": 66.0},
    "lung_disease": {"medfocusclip": 81.28, "clip": 70.0},
    "brain_tumor": {"medfocusclip": 86.09, "clip": 68.0},
    "breast_cancer": {"medfocusclip": 58.63, "clip": 29.0},
}


def _subsets(params: Params) -> list[tuple[float | None, int | None]]:
    return [(f, None) for f in params.evaluate.fractions] + [(None, k) for k in params.evaluate.shots]


def run_protocol(spec: DatasetSpec, params: Params, paths: DatasetPaths, progress: bool = True) -> tuple[list[dict], dict]:
    """All runs of the protocol, and per mode the identity of the features it used."""
    from tqdm import tqdm

    settings = params.evaluate
    prepared = load_prepared(spec, params, paths, progress=False)
    config = params.train.trainer_config()
    runs: list[dict] = []
    sources: dict[str, dict] = {}
    unavailable: dict[str, str] = {}
    total = len(settings.modes) * len(_subsets(params)) * len(settings.seeds) * len(settings.methods)
    with tqdm(total=total, desc=f"evaluate {spec.name}", unit="fit", disable=not progress) as bar:
        for mode in settings.modes:
            cached = load_cached_features(prepared, current_feature_store(spec, params, paths, mode))
            sources[mode] = cached.identity()
            test = cached.features.subset(cached.splits["test"])
            if len(test) == 0:
                raise ValueError(f"dataset {spec.name!r} has no test image with features: nothing to evaluate on")
            for fraction, shots in _subsets(params):
                for seed in settings.seeds:
                    train_set = cached.features.subset(cached.rows(subset_hashes(paths, fraction, shots, seed)))
                    for method in settings.methods:
                        bar.update(1)
                        try:
                            model = fit(method, train_set, cached.text, config, seed)
                        except MethodUnavailableError as error:
                            unavailable[f"{method}/{mode}"] = str(error)
                            continue
                        metrics = compute_metrics(test.labels, model.predict_proba(test), prepared.class_names)
                        runs.append({"method": method, "mode": mode, "fraction": fraction, "shots": shots, "seed": seed,
                                     "weights_source": cached.weights_source, "n_train": len(train_set),
                                     "fit_seconds": round(model.fit_info["fit_seconds"], 4), **metrics})
    for key, reason in unavailable.items():
        log.warning("skipped %s: %s", key, reason)
    return runs, {"features": sources, "skipped": unavailable}


def accuracy_table(aggregated: dict) -> list[dict]:
    """Flat rows (method, mode, fraction/shots, accuracy mean/std in %), for metrics.json, CSV and the report."""
    return [
        {"method": g["method"], "mode": g["mode"], "fraction": g["fraction"], "shots": g["shots"],
         "accuracy": round(100 * g["accuracy"]["mean"], 2), "accuracy_std": round(100 * g["accuracy"]["std"], 2),
         "balanced_accuracy": round(100 * g["balanced_accuracy"]["mean"], 2),
         "macro_f1": round(100 * g["macro_f1"]["mean"], 2),
         "auroc": None if g["auroc_ovr"]["mean"] is None else round(100 * g["auroc_ovr"]["mean"], 2),
         "seeds": g["n_runs"], "weights_source": g["weights_source"]}
        for g in aggregated["groups"]
    ]


def _write_plot_csv(rows: list[dict], path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["series", "fraction", "accuracy"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        if row["fraction"] is not None:
            writer.writerow({"series": f"{row['method']}/{row['mode']}", "fraction": row["fraction"], "accuracy": row["accuracy"]})
    write_atomic(path, buffer.getvalue())


def evaluate(spec: DatasetSpec, params: Params, paths: DatasetPaths, progress: bool = True) -> dict:
    started = time.perf_counter()
    runs, identity = run_protocol(spec, params, paths, progress)
    if not runs:
        raise ValueError(f"no method could run on {spec.name!r}: {identity['skipped']}")
    aggregated = aggregate(runs)
    table = accuracy_table(aggregated)
    weights_sources = sorted({run["weights_source"] for run in runs})
    random_init = any(is_random_init(source) for source in weights_sources)
    out = paths.evaluation_dir
    out.mkdir(parents=True, exist_ok=True)
    write_runs_csv(runs, paths.runs_csv)
    _write_plot_csv(table, out / "accuracy_vs_fraction.csv")
    title = f"{spec.name}: test accuracy vs training fraction"
    plot_accuracy_vs_fraction(aggregated, out / "accuracy_vs_fraction.png", title, ", ".join(weights_sources))
    best = max(table, key=lambda row: (row["fraction"] or 0, row["accuracy"]))
    confusion_run = next(run for run in runs if (run["method"], run["mode"], run["fraction"], run["shots"]) ==
                         (best["method"], best["mode"], best["fraction"], best["shots"]))
    plot_confusion_matrix(confusion_run["confusion_matrix"], confusion_run["class_names"], out / "confusion_matrix.png",
                          f"{spec.name}: {best['method']} ({best['mode']}), fraction {best['fraction']}, seed {confusion_run['seed']}"
                          + (f" — {RANDOM_INIT}" if random_init else ""))
    metrics = {
        "dataset": spec.name,
        "weights_source": weights_sources[0] if len(weights_sources) == 1 else weights_sources,
        "random_init": random_init,
        **({"warning": "RANDOM-INIT encoder: these numbers measure the pipeline, not the method; they are not results"} if random_init else {}),
        "test_images": runs[0]["n_samples"],
        "results": table,
        "paper_at_5_percent": PAPER_RESULTS_AT_5_PERCENT.get(spec.name),
        "confusion_matrix": {"method": best["method"], "mode": best["mode"], "fraction": best["fraction"],
                             "class_names": confusion_run["class_names"], "counts": confusion_run["confusion_matrix"]},
        "features": identity["features"],
        "skipped_methods": identity["skipped"],
        "protocol": params.evaluate.model_dump(),
        "train_settings": params.train.trainer_config().model_dump(by_alias=True),
        "seconds": round(time.perf_counter() - started, 2),
        "versions": package_versions(),
    }
    write_json(out / "aggregated.json", aggregated)
    write_json(paths.metrics, metrics)
    return metrics
