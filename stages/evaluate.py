"""The evaluate stage: the paper's protocol (methods × ROI modes × training fractions or k shots × seeds) on cached features.

Every method sees the same subsets, the same features and the same test set; hyperparameters are chosen inside the
training subset (see medfocus.trainer). Modes are compared on the same images: only images that have features in every
evaluated mode take part (how many were left out is in metrics.json). Outputs under ``cache/<dataset>/``:
``metrics.json`` (means ± std over seeds and bootstrap 95 % intervals over the test images, the encoder's weights
source on every row, the authors' numbers beside them, and ``summary``: the headline, compact table and per-class
results of :mod:`medfocus.pipeline.results_summary`, which the terminal and the report render), ``evaluation/runs.csv``
(one row per run), ``evaluation/*.png`` plots, and ``evaluation/accuracy_vs_fraction.csv`` and
``evaluation/roi_effect.csv`` (for ``dvc plots``).
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from medfocus.pipeline.cached_features import CachedFeatures, load_cached_features, store_identity, subset_hashes
from medfocus.pipeline.config import Params
from medfocus.pipeline.current_stores import current_feature_store, current_mask_store
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.manifest import write_atomic, write_json
from medfocus.pipeline.paper import paper_datasets, paper_results
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.preparation import load_prepared
from medfocus.pipeline.provenance import RANDOM_INIT, is_random_init, package_versions
from medfocus.pipeline.results_summary import summarize
from medfocus.pipeline.runner import parse_scheduler, run_tasks
from medfocus.pipeline.segmenters.roi_eval import dice_iou, load_truth_mask, mask_path_for
from medfocus.pipeline.store import FeatureStore, IncompleteImageError, StoreMissingError
from medfocus.pipeline.worker_models import set_torch_threads
from medfocus.trainer import (
    FeatureSet,
    MethodUnavailableError,
    aggregate,
    bootstrap_accuracy_ci,
    compute_metrics,
    fit,
    write_runs_csv,
)
from medfocus.trainer.plots import plot_accuracy_vs_fraction, plot_confusion_matrix

log = logging.getLogger(__name__)

# Ground-truth ROI masks, where a dataset has them: <root>/lesion_masks/<same relative folder>/<image stem>_mask.png
# (the demo's layout; list the folder under the dataset's ignore_folders so prepare takes it for no class).
GROUND_TRUTH_FOLDER = "lesion_masks"
GROUND_TRUTH_SUFFIX = "_mask.png"


def _subsets(params: Params) -> list[tuple[float | None, int | None]]:
    return [(f, None) for f in params.evaluate.fractions] + [(None, k) for k in params.evaluate.shots]


def _subset_label(fraction: float | None, shots: int | None) -> str:
    return f"{shots}-shot" if shots is not None else f"{100 * fraction:g}%"


@dataclass(frozen=True)
class SubsetFits:
    """One dask task: every method of the protocol fitted on one training subset in one mode, scored on the test set."""

    order: int  # position in the sequential protocol: runs are written in this order whatever the scheduler
    mode: str
    fraction: float | None
    shots: int | None
    seed: int
    hashes: tuple[str, ...]


# A worker's features, loaded once per evaluation and mode (a process of the processes / cluster schedulers keeps them
# for all its tasks; the threads and synchronous schedulers share the caller's).
_LOADED: dict[tuple[str, str], tuple[CachedFeatures, FeatureSet]] = {}
_LOADING = threading.Lock()


def _features_of(context: dict, mode: str) -> tuple[CachedFeatures, FeatureSet]:
    """The mode's cached features (the images common to all modes) and its test set."""
    key = (context["evaluation"], mode)
    with _LOADING:
        if key not in _LOADED:
            for stale in [k for k in _LOADED if k[0] != context["evaluation"]]:
                del _LOADED[stale]
            url, store_key = context["stores"][mode]
            store = FeatureStore.lookup(url, store_key, context["prepared"].name, mode)
            cached = load_cached_features(context["prepared"], store, only=set(context["common"]))
            _LOADED[key] = cached, cached.features.subset(cached.rows(context["test"]))
        return _LOADED[key]


def _fit_subset(task: SubsetFits, context: dict) -> list[dict]:
    """The runs of every method on ``task``'s subset; a method that cannot run on these features gives a skip record."""
    set_torch_threads(context["threads_split"])
    cached, test = _features_of(context, task.mode)
    train_set = cached.features.subset(cached.rows(list(task.hashes)))
    results = []
    for number, method in enumerate(context["methods"]):
        order = (task.order, number)
        try:
            model = fit(method, train_set, cached.text, context["config"], task.seed)
        except MethodUnavailableError as error:
            results.append({"order": order, "skipped": f"{method}/{task.mode}", "reason": str(error)})
            continue
        proba = model.predict_proba(test)
        correct = (proba.argmax(dim=1) == test.labels).int().tolist()
        results.append({"order": order, "method": method, "mode": task.mode, "fraction": task.fraction, "shots": task.shots,
                        "seed": task.seed, "weights_source": cached.weights_source, "n_train": len(train_set),
                        "fit_seconds": round(model.fit_info["fit_seconds"], 4),
                        # what the fit chose inside the training subset (C, α/β, a gate, medfocus_select's candidate)
                        "hyperparameters": model.fit_info.get("hyperparameters", {}),
                        **compute_metrics(test.labels, proba, context["prepared"].class_names),
                        "accuracy_ci95": list(bootstrap_accuracy_ci(correct)), "correct": correct})
    return results


def run_protocol(spec: DatasetSpec, params: Params, paths: DatasetPaths, progress: bool = True) -> tuple[list[dict], dict]:
    """All runs of the protocol; per mode the identity of the features it used; the images left out.

    The fits run on ``evaluate.scheduler`` (one task per training subset and mode); each fit is seeded by its run's
    seed, so the same thread count per worker gives the same runs on any scheduler. Runs carry ``correct`` (0/1 per
    test image, in one order for every run) for the bootstrap intervals.
    """
    from tqdm import tqdm

    settings = params.evaluate
    prepared = load_prepared(spec, params, paths, progress=False)
    prepared.require_two_classes()
    stores = {mode: current_feature_store(spec, params, paths, mode) for mode in settings.modes}
    all_hashes = [entry.hash for entry in prepared.entries]
    common = set(all_hashes)
    for store in stores.values():
        common &= store.done(all_hashes)
    test_all = [entry.hash for entry in prepared.entries if entry.split == "test"]
    test_kept = [digest for digest in test_all if digest in common]
    if not test_kept:
        raise ValueError(f"dataset {spec.name!r} has no test image with features in every mode {settings.modes}: nothing to evaluate on")
    alignment = {
        "modes": list(settings.modes),
        "test_images": len(test_kept),
        "test_images_left_out": len(test_all) - len(test_kept),
        "train_images_left_out": sum(1 for entry in prepared.entries if entry.split == "train" and entry.hash not in common),
        "subset_images_left_out": {},
        "why": "only images with features in every evaluated mode are used, so all modes are compared on the same images",
    }
    if alignment["test_images_left_out"] or alignment["train_images_left_out"]:
        log.warning("%d test and %d training image(s) lack features in some mode of %s and are left out of every mode",
                    alignment["test_images_left_out"], alignment["train_images_left_out"], settings.modes)
    subsets = {}
    for fraction, shots in _subsets(params):
        for seed in settings.seeds:
            hashes = subset_hashes(paths, fraction, shots, seed)
            kept = [digest for digest in hashes if digest in common]
            if not kept:
                raise ValueError(f"the {_subset_label(fraction, shots)} subset of seed {seed} has no image with features in every mode {settings.modes}")
            if len(kept) < len(hashes):
                alignment["subset_images_left_out"][f"{_subset_label(fraction, shots)} seed {seed}"] = len(hashes) - len(kept)
            subsets[(fraction, shots, seed)] = kept

    tasks = [SubsetFits(order, mode, fraction, shots, seed, tuple(hashes))
             for order, (mode, ((fraction, shots, seed), hashes)) in enumerate(itertools.product(settings.modes, subsets.items()))]
    # Longest first, so that no long fit is left to run alone at the end: the biggest subsets, and at one size the mode
    # with the ROI view (only there do the dual-view methods fit).
    tasks.sort(key=lambda task: (len(task.hashes), task.mode == "dual"), reverse=True)
    choice = parse_scheduler(settings.scheduler, settings.workers)
    context = {
        "evaluation": uuid.uuid4().hex, "prepared": prepared, "common": sorted(common), "test": test_kept,
        "stores": {mode: (store.url, store.key) for mode, store in stores.items()},
        "methods": list(settings.methods), "config": params.train.trainer_config(),
        "threads_split": 1 if choice.kind == "synchronous" else settings.workers,
    }
    threads = torch.get_num_threads()  # the threads and synchronous schedulers set this process's torch threads
    try:
        with tqdm(total=len(tasks) * len(settings.methods), desc=f"evaluate {spec.name}", unit="fit", disable=not progress) as bar:
            results = sorted(run_tasks(_fit_subset, tasks, context, choice, bar), key=lambda result: result["order"])
    finally:
        _LOADED.clear()
        torch.set_num_threads(threads)
    runs = [{key: value for key, value in result.items() if key != "order"} for result in results if "skipped" not in result]
    unavailable = {result["skipped"]: result["reason"] for result in results if "skipped" in result}
    for key, reason in unavailable.items():
        log.warning("skipped %s: %s", key, reason)
    sources = {mode: store_identity(store) for mode, store in stores.items()}
    return runs, {"features": sources, "skipped": unavailable, "images": alignment}


def _percent(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


def accuracy_table(aggregated: dict) -> list[dict]:
    """Flat rows (method, mode, fraction/shots, accuracy mean/std and 95 % CI in %), for metrics.json, CSV and the report."""
    return [
        {"method": g["method"], "mode": g["mode"], "fraction": g["fraction"], "shots": g["shots"],
         "accuracy": _percent(g["accuracy"]["mean"]), "accuracy_std": _percent(g["accuracy"]["std"]),
         "accuracy_ci95": None if g.get("accuracy_ci95") is None else [_percent(bound) for bound in g["accuracy_ci95"]],
         "balanced_accuracy": _percent(g["balanced_accuracy"]["mean"]),
         "macro_f1": _percent(g["macro_f1"]["mean"]),
         "auroc": _percent(g["auroc_ovr"]["mean"]),
         "sensitivity": {name: _percent(value["mean"]) for name, value in g.get("per_class_recall", {}).items()},
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


def _write_roi_effect_csv(effect: dict, path) -> None:
    """The ROI's effect per training fraction (best ROI row minus best whole-image row, points, with its interval)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["series", "fraction", "effect", "ci95_low", "ci95_high", "roi_row", "whole_image_row"],
                            lineterminator="\n")
    writer.writeheader()
    for entry in effect["by_column"]:
        if entry["fraction"] is not None:
            low, high = entry["ci95"] or (None, None)
            writer.writerow({"series": "best ROI row − best whole-image row", "fraction": entry["fraction"],
                             "effect": entry["difference"], "ci95_low": low, "ci95_high": high,
                             "roi_row": entry["roi"]["label"], "whole_image_row": entry["whole"]["label"]})
    write_atomic(path, buffer.getvalue())


def confusion_run(runs: list[dict], params: Params) -> tuple[dict, str]:
    """The run whose confusion matrix is shown, fixed in advance (never chosen by test accuracy), and why it.

    It is params.train's method and mode at the largest training fraction (the largest k-shot subset without
    fractions) and the first evaluated seed; when evaluate did not run that method/mode, the first evaluated
    method/mode in evaluate.methods × evaluate.modes order.
    """
    settings = params.evaluate
    subset = (max(settings.fractions), None) if settings.fractions else (None, max(settings.shots))
    seed = settings.seeds[0]
    at_subset = {(run["method"], run["mode"]): run for run in runs
                 if (run["fraction"], run["shots"], run["seed"]) == (*subset, seed)}
    wanted = (params.train.method, params.train.mode)
    if wanted in at_subset:
        return at_subset[wanted], f"train.method/train.mode, {_subset_label(*subset)}, seed {seed}"
    first = next(key for key in ((m, mode) for m in settings.methods for mode in settings.modes) if key in at_subset)
    return at_subset[first], (f"train.method/train.mode {wanted[0]}/{wanted[1]} not evaluated: first evaluated method/mode, "
                              f"{_subset_label(*subset)}, seed {seed}")


def roi_quality(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> dict | None:
    """Dice and IoU of the stored ROIs against the dataset's ground-truth masks (:data:`GROUND_TRUTH_FOLDER`), over
    every image that has one and masks in the store; None when the dataset has no such masks. Reads the mask store
    only (no segmenter runs), in its frame (see :mod:`medfocus.pipeline.segmenters.roi_eval`)."""
    prepared = load_prepared(spec, params, paths, progress=False)
    truth_root = prepared.root / GROUND_TRUTH_FOLDER
    if not truth_root.is_dir():
        return None
    try:
        store = current_mask_store(spec, params, paths)
    except StoreMissingError:
        return None
    scores = []
    for entry in prepared.entries:
        truth = mask_path_for(prepared.image_path(entry), prepared.root.resolve(), truth_root, GROUND_TRUTH_SUFFIX)
        if not truth.is_file():
            continue
        try:
            roi, _ = store.read_masks(entry.hash)
        except IncompleteImageError:
            continue
        scores.append(dice_iou(roi, load_truth_mask(truth, roi.shape[0])))
    if not scores:
        return None
    dice, iou = np.mean(np.asarray(scores), axis=0)
    return {"dice": round(float(dice), 4), "iou": round(float(iou), 4), "n": len(scores), "truth": str(truth_root)}


def _facts(spec: DatasetSpec, paths: DatasetPaths, metrics_images: dict, random_init: bool) -> tuple[dict, dict]:
    """What the headline says of the data and the models, from prepare.json, segment.json and features.json."""
    def read(path: Path) -> dict:
        return read_json(path) if path.exists() else {}

    prepare, segment, features = read(paths.prepare_summary), read(paths.segment_summary), read(paths.features_summary)
    counts = prepare.get("counts", {"train": {}, "test": {}})
    names = [c["name"] for c in prepare.get("classes", [])] or sorted(set(counts["train"]) | set(counts["test"]))
    dataset = {"name": spec.name, "images": prepare.get("images"),
               "train_images": sum(counts["train"].values()) - metrics_images.get("train_images_left_out", 0),
               "test_images": metrics_images["test_images"],
               "classes": [{"name": n, "train": counts["train"].get(n, 0), "test": counts["test"].get(n, 0)} for n in names]}
    encoder = features.get("encoder", {})
    segmenter, model = segment.get("spec", {}), segment.get("spec", {}).get("model", {})
    segmenter_random = bool(segment.get("random_init"))
    models = {
        "encoder": {"name": encoder.get("model"), "weights": features.get("weights_source"), "sha256": encoder.get("weights_sha256"),
                    "random_init": bool(random_init or features.get("random_init"))},
        "segmenter": {"name": segmenter.get("backend"), "policy": segment.get("policy"), "sha256": model.get("weights_sha256"),
                      "weights": RANDOM_INIT if segmenter_random else f"pretrained: {model.get('name')}",
                      "random_init": segmenter_random},
    }
    return dataset, models


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
    title = f"{spec.name}: test accuracy vs training fraction"
    plot_accuracy_vs_fraction(aggregated, out / "accuracy_vs_fraction.png", title, ", ".join(weights_sources),
                              random_init=random_init)
    shown, chosen_by = confusion_run(runs, params)
    plot_confusion_matrix(shown["confusion_matrix"], shown["class_names"], out / "confusion_matrix.png",
                          f"{spec.name}: {shown['method']} ({shown['mode']}), {_subset_label(shown['fraction'], shown['shots'])}, "
                          f"seed {shown['seed']}\nchosen in advance: {chosen_by}" + (f"\n{RANDOM_INIT}" if random_init else ""))
    metrics = {
        "dataset": spec.name,
        "weights_source": weights_sources[0] if len(weights_sources) == 1 else weights_sources,
        "random_init": random_init,
        **({"warning": "RANDOM-INIT encoder: these numbers measure the pipeline, not the method; they are not results"} if random_init else {}),
        "test_images": identity["images"]["test_images"],
        "images": identity["images"],
        "results": table,
        "accuracy_ci95": aggregated["accuracy_ci95"],
        "paper": paper_results(spec.name),
        "confusion_matrix": {"method": shown["method"], "mode": shown["mode"], "fraction": shown["fraction"],
                             "shots": shown["shots"], "seed": shown["seed"], "chosen_by": chosen_by,
                             "class_names": shown["class_names"], "counts": shown["confusion_matrix"]},
        "features": identity["features"],
        "skipped_methods": identity["skipped"],
        "protocol": params.evaluate.model_dump(),
        "train_settings": params.train.trainer_config().model_dump(by_alias=True),
        "seconds": round(time.perf_counter() - started, 2),
        "versions": package_versions(),
    }
    dataset, models = _facts(spec, paths, identity["images"], random_init)
    chosen = {key: shown[key] for key in ("method", "mode", "fraction", "shots")}
    chosen["chosen_by"] = ("params.yaml's train.method/train.mode, the head that medfocus train fits"
                           if (shown["method"], shown["mode"]) == (params.train.method, params.train.mode) else
                           f"train.method/train.mode {params.train.method}/{params.train.mode} not evaluated: the first evaluated "
                           "method/mode")
    metrics["summary"] = summarize(table, runs, dataset=dataset, models=models, paper=metrics["paper"],
                                   paper_datasets=paper_datasets(), chosen=chosen, roi_quality=roi_quality(spec, params, paths),
                                   methods=list(params.evaluate.methods), modes=list(params.evaluate.modes),
                                   skipped=identity["skipped"])
    # For `dvc plots`: one line per row of the compact table (a global-embedding method's dual row, the same numbers as
    # its none row, is left out), and the ROI's effect per training fraction.
    merged = set(metrics["summary"]["table"]["merged"])
    _write_plot_csv([row for row in table if not (row["method"] in merged and row["mode"] == "dual")], out / "accuracy_vs_fraction.csv")
    _write_roi_effect_csv(metrics["summary"]["roi_effect"], out / "roi_effect.csv")
    write_json(out / "aggregated.json", aggregated)
    write_json(paths.metrics, metrics)
    return metrics
