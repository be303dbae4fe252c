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

from medfocus.pipeline.cached_features import (
    CachedFeatures,
    load_cached_features,
    load_image_features,
    store_identity,
    subset_hashes,
)
from medfocus.pipeline.config import Params
from medfocus.pipeline.current_stores import current_feature_store, current_mask_store
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.external import load_externals, map_probabilities, mapping_matrix, read_groups, sets_for
from medfocus.pipeline.feature_bank import feature_store_locator, open_feature_store
from medfocus.pipeline.manifest import write_atomic, write_json
from medfocus.pipeline.paper import paper_datasets, paper_results
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.preparation import load_prepared
from medfocus.pipeline.provenance import RANDOM_INIT, is_random_init, package_versions
from medfocus.pipeline.results_summary import summarize
from medfocus.pipeline.runner import parse_scheduler, run_tasks
from medfocus.pipeline.segmenters.roi_eval import dice_iou, load_truth_mask, mask_path_for
from medfocus.pipeline.store import IncompleteImageError, StoreMissingError
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


# ---------------------------------------------------------------------------------------------------- external test sets
def score_external(proba, labels: list[int], matrix: np.ndarray, columns: list[str], groups: list[str] | None = None) -> dict:
    """One fit on one external set (pipeline.external): the metrics of :func:`compute_metrics` over the prediction
    columns (the external classes, then the unmapped training classes: predicting one of those is an error), the
    run's bootstrap interval and ``correct`` (0/1 per external image, for the setting's interval over seeds); with
    ``groups`` (each image's group of the set's groups file), ``group_accuracy``: the run's accuracy within each group."""
    mapped = map_probabilities(proba, matrix)
    metrics = compute_metrics(np.asarray(labels), mapped, columns)
    correct = (mapped.argmax(axis=1) == np.asarray(labels)).astype(int)
    keep = ("n_samples", "accuracy", "balanced_accuracy", "macro_f1", "auroc_ovr", "per_class_recall", "confusion_matrix",
            "class_names")
    out = {key: metrics[key] for key in keep} | {"accuracy_ci95": list(bootstrap_accuracy_ci(correct)), "correct": correct.tolist()}
    if groups is not None:
        of_image = np.array(groups, dtype=object)
        out["group_accuracy"] = {group: float(correct[of_image == group].mean()) for group in sorted(set(groups))}
    return out


EXTERNAL_RUN_COLUMNS = ("accuracy", "accuracy_ci95", "balanced_accuracy", "macro_f1", "auroc_ovr", "n_samples")


def flat_run(run: dict) -> dict:
    """A run as runs.csv writes it: each external set's scalars as ``external[NAME].accuracy``, ... columns, and with a
    groups file ``external[NAME].group[GROUP].accuracy`` (its per-image ``correct`` and confusion matrix stay in
    metrics.json's aggregates)."""
    out = {key: value for key, value in run.items() if key != "external"}
    for name, scores in (run.get("external") or {}).items():
        for key in EXTERNAL_RUN_COLUMNS:
            out[f"external[{name}].{key}"] = scores[key]
        for group, accuracy in scores.get("group_accuracy", {}).items():
            out[f"external[{name}].group[{group}].accuracy"] = accuracy
    return out


def _accuracy_over_seeds(correct: list[list[int]]) -> dict:
    """Accuracy mean ± std over seeds (%) and the bootstrap 95 % interval over the images of the accuracy averaged
    over seeds (the internal rows' rule), from each seed's 0/1 per image."""
    accuracy = np.array([np.mean(seed) for seed in correct])
    return {"accuracy": _percent(float(accuracy.mean())),
            "accuracy_std": _percent(float(accuracy.std(ddof=1)) if len(accuracy) > 1 else 0.0),
            "accuracy_ci95": [_percent(b) for b in bootstrap_accuracy_ci(correct)]}


def aggregate_external(runs: list[dict], sets: dict[str, dict] | None = None) -> dict[tuple, dict[str, dict]]:
    """Per (method, mode, fraction, shots) and external set: accuracy mean ± std over seeds (%), the bootstrap 95 %
    interval over the external images of the accuracy averaged over seeds (the internal rows' rule), and the mean
    balanced accuracy and macro-F1 (%). A set whose entry in ``sets`` (evaluate's external context) has ``groups``
    (each image's group; ``labels``: its class index into ``columns``) also gets ``groups``: per group the same accuracy
    figures, its image count and the recall of each class it holds (%, mean over seeds)."""
    settings: dict[tuple, list[dict]] = {}
    for run in runs:
        settings.setdefault((run["method"], run["mode"], run.get("fraction"), run.get("shots")), []).append(run)
    out: dict[tuple, dict[str, dict]] = {}
    for key, members in settings.items():
        names = list(dict.fromkeys(name for run in members for name in (run.get("external") or {})))
        for name in names:
            scores = [run["external"][name] for run in members if name in (run.get("external") or {})]
            correct = np.array([s["correct"] for s in scores])
            out.setdefault(key, {})[name] = {
                **_accuracy_over_seeds(correct.tolist()),
                "balanced_accuracy": _percent(float(np.mean([s["balanced_accuracy"] for s in scores]))),
                "macro_f1": _percent(float(np.mean([s["macro_f1"] for s in scores]))),
                "images": scores[0]["n_samples"], "seeds": len(scores),
            }
            external = (sets or {}).get(name, {})
            if "groups" in external:
                of_image, labels = np.array(external["groups"], dtype=object), np.array(external["labels"])
                out[key][name]["groups"] = {
                    group: {**_accuracy_over_seeds(correct[:, of_image == group].tolist()), "images": int((of_image == group).sum()),
                            "recall": {cls: _percent(float(correct[:, (of_image == group) & (labels == index)].mean()))
                                       for index, cls in enumerate(external["columns"])
                                       if ((of_image == group) & (labels == index)).any()}}
                    for group in sorted(set(of_image))}
    return out


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
_LOADED: dict[tuple[str, str], tuple[CachedFeatures, FeatureSet, dict[str, FeatureSet]]] = {}
_LOADING = threading.Lock()


def _features_of(context: dict, mode: str) -> tuple[CachedFeatures, FeatureSet, dict[str, FeatureSet]]:
    """The mode's cached features (the images common to all modes), its test set and each external test set."""
    key = (context["evaluation"], mode)
    with _LOADING:
        if key not in _LOADED:
            for stale in [k for k in _LOADED if k[0] != context["evaluation"]]:
                del _LOADED[stale]
            store = open_feature_store(context["stores"][mode], context["prepared"].name, mode)
            cached = load_cached_features(context["prepared"], store, only=set(context["common"]))
            external = {name: load_image_features(store, item["hashes"], item["labels"])
                        for name, item in context["external"].items()}
            _LOADED[key] = cached, cached.features.subset(cached.rows(context["test"])), external
        return _LOADED[key]


def _fit_subset(task: SubsetFits, context: dict) -> list[dict]:
    """The runs of every method on ``task``'s subset; a method that cannot run on these features gives a skip record."""
    set_torch_threads(context["threads_split"])
    cached, test, external_sets = _features_of(context, task.mode)
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
        # The same fit on each external test set (pipeline.external): probabilities summed over the mapped classes.
        external = {name: score_external(model.predict_proba(features), context["external"][name]["labels"],
                                         context["external"][name]["matrix"], context["external"][name]["columns"],
                                         context["external"][name].get("groups"))
                    for name, features in external_sets.items()}
        results.append({"order": order, "method": method, "mode": task.mode, "fraction": task.fraction, "shots": task.shots,
                        "seed": task.seed, "weights_source": cached.weights_source, "n_train": len(train_set),
                        "fit_seconds": round(model.fit_info["fit_seconds"], 4),
                        # what the fit chose inside the training subset (C, α/β, a gate, medfocus_select's candidate)
                        "hyperparameters": model.fit_info.get("hyperparameters", {}),
                        **compute_metrics(test.labels, proba, context["prepared"].class_names),
                        "accuracy_ci95": list(bootstrap_accuracy_ci(correct)), "correct": correct,
                        **({"external": external} if external else {})})
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

    external_context, external_images = _external_context(spec, params, paths, prepared, stores)
    tasks = [SubsetFits(order, mode, fraction, shots, seed, tuple(hashes))
             for order, (mode, ((fraction, shots, seed), hashes)) in enumerate(itertools.product(settings.modes, subsets.items()))]
    # Longest first, so that no long fit is left to run alone at the end: the biggest subsets, and at one size the mode
    # with the ROI view (only there do the dual-view methods fit).
    tasks.sort(key=lambda task: (len(task.hashes), task.mode == "dual"), reverse=True)
    choice = parse_scheduler(settings.scheduler, settings.workers)
    context = {
        "evaluation": uuid.uuid4().hex, "prepared": prepared, "common": sorted(common), "test": test_kept,
        "stores": {mode: feature_store_locator(store) for mode, store in stores.items()},
        "methods": list(settings.methods), "config": params.train.trainer_config(),
        "threads_split": 1 if choice.kind == "synchronous" else settings.workers,
        "external": external_context,
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
    # The encoder as the evaluated stores record it (features.json describes the last features run, which may have
    # been of another encoder): its name (every encoder of a bank), weights and sha256.
    attrs = next(iter(stores.values())).attrs
    encoder = {"name": attrs["spec"]["encoder"].get("model"), "weights": attrs["provenance"]["weights_source"],
               "sha256": attrs["spec"]["encoder"].get("weights_sha256")}
    return runs, {"features": sources, "encoder": encoder, "skipped": unavailable, "images": alignment,
                  "external": external_images, "external_context": external_context}


def _external_context(spec: DatasetSpec, params: Params, paths: DatasetPaths, prepared, stores: dict) -> tuple[dict, dict]:
    """Per external test set (pipeline.external): the images with features in every evaluated mode, their labels (the
    external classes), the class-mapping matrix, the prediction columns and, with a groups file, each image's group;
    and per set what was left out (and the images per group and class)."""
    context, images = {}, {}
    for external in load_externals(spec, params, paths, prepared):
        hashes = [entry.hash for entry in external.entries]
        have = set(hashes)
        for store in stores.values():
            have &= store.done(hashes)
        kept = [entry for entry in external.entries if entry.hash in have]
        if not kept:
            raise FileNotFoundError(f"external set {external.name!r} of {spec.name!r} has no image with features in every "
                                    f"mode {list(stores)}: run `medfocus segment` and `medfocus features --dataset {spec.name}`")
        if len(kept) < len(hashes):
            log.warning("%d image(s) of external set %s lack features in some mode and are left out", len(hashes) - len(kept),
                        external.name)
        index = {name: i for i, name in enumerate(external.class_names)}
        context[external.name] = {
            "hashes": [entry.hash for entry in kept], "labels": [index[entry.label] for entry in kept],
            "matrix": mapping_matrix(external.class_map, external.class_names, prepared.class_names),
            "columns": external.columns(prepared.class_names),
        }
        images[external.name] = {"images": len(kept), "left_out": len(hashes) - len(kept),
                                 "classes": external.class_names, "class_map": external.class_map,
                                 "columns": context[external.name]["columns"],
                                 "counts": {name: sum(entry.label == name for entry in kept) for name in external.class_names}}
        groups_file = sets_for(spec.name, params)[external.name].groups
        if groups_file:
            read = read_groups(external, groups_file)
            group_of = dict(zip((entry.hash for entry in external.entries), read.of_image))
            kept_groups = [group_of[entry.hash] for entry in kept]
            context[external.name]["groups"] = kept_groups
            images[external.name]["groups"] = {
                "file": groups_file, "rows_naming_no_image": read.rows_naming_no_image,
                "counts": {group: {name: sum(g == group and entry.label == name for g, entry in zip(kept_groups, kept))
                                   for name in external.class_names} for group in sorted(set(kept_groups))}}
    return context, images


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
            for name, scores in row.get("external", {}).items():  # the same row on each external test set
                writer.writerow({"series": f"{row['method']}/{row['mode']} @ external {name}", "fraction": row["fraction"],
                                 "accuracy": scores["accuracy"]})
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


def _facts(spec: DatasetSpec, paths: DatasetPaths, metrics_images: dict, random_init: bool, encoder: dict) -> tuple[dict, dict]:
    """What the headline says of the data and the models, from prepare.json and segment.json, and of the encoder
    ``encoder`` (the evaluated stores' record)."""
    def read(path: Path) -> dict:
        return read_json(path) if path.exists() else {}

    prepare, segment = read(paths.prepare_summary), read(paths.segment_summary)
    counts = prepare.get("counts", {"train": {}, "test": {}})
    names = [c["name"] for c in prepare.get("classes", [])] or sorted(set(counts["train"]) | set(counts["test"]))
    dataset = {"name": spec.name, "images": prepare.get("images"),
               "train_images": sum(counts["train"].values()) - metrics_images.get("train_images_left_out", 0),
               "test_images": metrics_images["test_images"],
               "classes": [{"name": n, "train": counts["train"].get(n, 0), "test": counts["test"].get(n, 0)} for n in names]}
    segmenter, model = segment.get("spec", {}), segment.get("spec", {}).get("model", {})
    segmenter_random = bool(segment.get("random_init"))
    models = {
        "encoder": encoder | {"random_init": bool(random_init or is_random_init(encoder["weights"]))},
        # None when no segmenter ran for these features (only modes without an ROI).
        "segmenter": {"name": segmenter.get("backend"), "policy": segment.get("policy"), "sha256": model.get("weights_sha256"),
                      "weights": RANDOM_INIT if segmenter_random else f"pretrained: {model.get('name')}",
                      "random_init": segmenter_random} if segmenter else None,
    }
    return dataset, models


def _external_metrics(spec: DatasetSpec, paths: DatasetPaths, images: dict, shown: dict, chosen_by: str) -> dict:
    """metrics.json's ``external``: per set what prepare found (external.json: classes, class map, copies of the
    training source removed, with counts and examples), the images evaluated, and the confusion matrix of the run
    fixed in advance (the internal confusion matrix's run; rows: true external classes, columns: the prediction
    columns, an unmapped training class last)."""
    if not images:
        return {}
    prepared = read_json(paths.external_summary)["sets"]
    out = {}
    for name, evaluated in images.items():
        scores = shown.get("external", {}).get(name)
        rows = len(evaluated["classes"])
        out[name] = {**{key: prepared[name][key] for key in ("root", "files_found", "unreadable", "duplicates_within_set",
                                                             "copies_of_training_source", "unmapped_training_classes")},
                     **evaluated,
                     "confusion_matrix": None if scores is None else {
                         "method": shown["method"], "mode": shown["mode"], "fraction": shown["fraction"],
                         "shots": shown["shots"], "seed": shown["seed"], "chosen_by": chosen_by,
                         "true_classes": evaluated["classes"], "predicted_columns": scores["class_names"],
                         "counts": scores["confusion_matrix"][:rows], "accuracy": _percent(scores["accuracy"])}}
    return out


def _write_external_plots(spec: DatasetSpec, paths: DatasetPaths, aggregated: dict, external: dict,
                          weights_sources: list[str], random_init: bool) -> None:
    """``evaluation/external/`` (always made, one DVC output): per external set its accuracy against the training
    fraction (same layout as the internal plot) and the confusion matrix of the run fixed in advance; ``index.json``
    names them."""
    folder = paths.external_evaluation_dir
    if folder.exists():
        for stale in folder.iterdir():
            stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, item in external.items():
        groups = []
        for group in aggregated["groups"]:
            scores = group.get("external", {}).get(name)
            if scores is not None:
                groups.append(group | {"accuracy": {"mean": scores["accuracy"] / 100, "std": scores["accuracy_std"] / 100}})
        files = {}
        if any(g.get("fraction") is not None or g.get("shots") is not None for g in groups):
            files["accuracy"] = f"{name}_accuracy_vs_fraction.png"
            plot_accuracy_vs_fraction({"groups": groups}, folder / files["accuracy"],
                                      f"{spec.name} -> external {name}: accuracy vs training fraction",
                                      ", ".join(weights_sources), random_init=random_init)
        matrix = item["confusion_matrix"]
        if matrix is not None:
            files["confusion_matrix"] = f"{name}_confusion_matrix.png"
            columns = matrix["predicted_columns"]
            counts = matrix["counts"] + [[0] * len(columns)] * (len(columns) - len(matrix["counts"]))
            plot_confusion_matrix(counts, columns, folder / files["confusion_matrix"],
                                  f"{spec.name} -> external {name}: {matrix['method']} ({matrix['mode']}), "
                                  f"{_subset_label(matrix['fraction'], matrix['shots'])}, seed {matrix['seed']}"
                                  + (f"\n{RANDOM_INIT}" if random_init else ""))
        index[name] = files
    write_json(folder / "index.json", {"dataset": spec.name, "sets": index})


def evaluate(spec: DatasetSpec, params: Params, paths: DatasetPaths, progress: bool = True) -> dict:
    started = time.perf_counter()
    runs, identity = run_protocol(spec, params, paths, progress)
    if not runs:
        raise ValueError(f"no method could run on {spec.name!r}: {identity['skipped']}")
    aggregated = aggregate(runs)
    table = accuracy_table(aggregated)
    external_sets = identity["external"]
    if external_sets:
        # Each row's accuracy on each external test set, beside its internal accuracy (same fits).
        by_setting = aggregate_external(runs, identity["external_context"])
        for row in [*table, *aggregated["groups"]]:
            row["external"] = by_setting.get((row["method"], row["mode"], row["fraction"], row["shots"]), {})
    weights_sources = sorted({run["weights_source"] for run in runs})
    random_init = any(is_random_init(source) for source in weights_sources)
    out = paths.evaluation_dir
    out.mkdir(parents=True, exist_ok=True)
    write_runs_csv([flat_run(run) for run in runs], paths.runs_csv)
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
        "external": _external_metrics(spec, paths, external_sets, shown, chosen_by),
        "skipped_methods": identity["skipped"],
        "protocol": params.evaluate.model_dump(),
        "train_settings": params.train.trainer_config().model_dump(by_alias=True),
        "seconds": round(time.perf_counter() - started, 2),
        "versions": package_versions(),
    }
    dataset, models = _facts(spec, paths, identity["images"], random_init, identity["encoder"])
    chosen = {key: shown[key] for key in ("method", "mode", "fraction", "shots")}
    chosen["chosen_by"] = ("params.yaml's train.method/train.mode, the head that medfocus train fits"
                           if (shown["method"], shown["mode"]) == (params.train.method, params.train.mode) else
                           f"train.method/train.mode {params.train.method}/{params.train.mode} not evaluated: the first evaluated "
                           "method/mode")
    metrics["summary"] = summarize(table, runs, dataset=dataset, models=models, paper=metrics["paper"],
                                   paper_datasets=paper_datasets(), chosen=chosen, roi_quality=roi_quality(spec, params, paths),
                                   methods=list(params.evaluate.methods), modes=list(params.evaluate.modes),
                                   skipped=identity["skipped"], external=metrics["external"])
    # For `dvc plots`: one line per row of the compact table (a global-embedding method's dual row, the same numbers as
    # its none row, is left out), and the ROI's effect per training fraction.
    merged = set(metrics["summary"]["table"]["merged"])
    _write_plot_csv([row for row in table if not (row["method"] in merged and row["mode"] == "dual")], out / "accuracy_vs_fraction.csv")
    _write_external_plots(spec, paths, aggregated, metrics["external"], weights_sources, random_init)
    _write_roi_effect_csv(metrics["summary"]["roi_effect"], out / "roi_effect.csv")
    write_json(out / "aggregated.json", aggregated)
    write_json(paths.metrics, metrics)
    return metrics
