"""The evaluate stage: the paper's protocol (methods × ROI modes × training fractions or k shots × seeds) on cached features.

Every method sees the same subsets, the same features and the same test set; hyperparameters are chosen inside the
training subset (see medfocus.trainer). Modes are compared on the same images: only images that have features in every
evaluated mode take part (how many were left out is in metrics.json). Outputs under ``cache/<dataset>/``:
``metrics.json`` (means ± std over seeds and bootstrap 95 % intervals over the test images, the encoder's weights
source on every row, the authors' numbers beside them), ``evaluation/runs.csv`` (one row per run), ``evaluation/*.png``
plots and ``evaluation/accuracy_vs_fraction.csv`` (for ``dvc plots``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.manifest import write_atomic, write_json
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.provenance import RANDOM_INIT, is_random_init, package_versions
from medfocus.pipeline.runner import parse_scheduler, run_tasks
from medfocus.pipeline.store import FeatureStore
from medfocus.trainer import FeatureSet, MethodUnavailableError, aggregate, bootstrap_accuracy_ci, compute_metrics, fit, write_runs_csv
from medfocus.trainer.plots import plot_accuracy_vs_fraction, plot_confusion_matrix

from .common import load_prepared, set_torch_threads
from .train import CachedFeatures, current_feature_store, feature_identity, load_cached_features, subset_hashes

log = logging.getLogger(__name__)

PAPER_RESULTS_FILE = Path(__file__).with_name("paper_results.json")


@cache
def _paper_file() -> dict:
    return json.loads(PAPER_RESULTS_FILE.read_text())


def paper_results(dataset: str) -> dict[str, dict[float, float]] | None:
    """The authors' test accuracy (%) for ``dataset``: {method label: {training fraction: accuracy}}, or None."""
    table = _paper_file()["results"].get(dataset)
    if table is None:
        return None
    return {label: {float(fraction): value for fraction, value in by_fraction.items()} for label, by_fraction in table.items()}


def paper_datasets() -> list[str]:
    return sorted(_paper_file()["results"])


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
    sources = {mode: feature_identity(store.attrs) for mode, store in stores.items()}
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
    shown, chosen_by = confusion_run(runs, params)
    plot_confusion_matrix(shown["confusion_matrix"], shown["class_names"], out / "confusion_matrix.png",
                          f"{spec.name}: {shown['method']} ({shown['mode']}), {_subset_label(shown['fraction'], shown['shots'])}, "
                          f"seed {shown['seed']}\nchosen in advance: {chosen_by}" + (f" — {RANDOM_INIT}" if random_init else ""))
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
    write_json(out / "aggregated.json", aggregated)
    write_json(paths.metrics, metrics)
    return metrics
