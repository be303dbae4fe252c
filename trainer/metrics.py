"""Classification metrics of one run, their mean ± std over seeds, and the per-run CSV.

Conventions follow scikit-learn where it has one: balanced accuracy averages recall over the classes present in
``y_true``; macro-F1 averages over the classes present in ``y_true`` or predicted; one-vs-rest AUROC is the macro mean
over classes that have both positives and negatives in ``y_true`` — the others are skipped and listed with the reason
(scikit-learn would raise instead).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SCALAR_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc_ovr")
RUN_KEYS = ("method", "mode", "fraction", "shots", "seed", "weights_source")
PER_IMAGE_KEYS = ("correct",)  # per-test-image values a run may carry for the bootstrap; not written to runs.csv
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95


def _as_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (what the Mann–Whitney form of AUROC needs)."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    group_rank = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting one half."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    ranks = _average_ranks(scores.astype(np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def compute_metrics(y_true, proba, class_names: list[str]) -> dict[str, Any]:
    """Metrics of one run from true labels (N,) and class probabilities (N, C); predictions are the argmax."""
    labels = _as_numpy(y_true).astype(np.int64).reshape(-1)
    probabilities = _as_numpy(proba).astype(np.float64)
    num_classes = len(class_names)
    if probabilities.ndim != 2 or probabilities.shape != (len(labels), num_classes):
        raise ValueError(f"proba must be (N={len(labels)}, C={num_classes}), got shape {probabilities.shape}")
    if len(labels) == 0:
        raise ValueError("no samples to score")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_counts = confusion.sum(axis=1)
    predicted_counts = confusion.sum(axis=0)
    hits = np.diag(confusion)

    present = true_counts > 0
    recall = {name: (float(hits[c] / true_counts[c]) if present[c] else None) for c, name in enumerate(class_names)}
    scored_for_f1 = present | (predicted_counts > 0)
    f1 = 2.0 * hits / np.maximum(true_counts + predicted_counts, 1)

    auroc_per_class: dict[str, float] = {}
    auroc_skipped: dict[str, str] = {}
    for c, name in enumerate(class_names):
        positive = labels == c
        if not positive.any():
            auroc_skipped[name] = "no samples of this class in y_true"
        elif positive.all():
            auroc_skipped[name] = "every sample is of this class (no negatives)"
        else:
            auroc_per_class[name] = binary_auroc(positive, probabilities[:, c])

    return {
        "n_samples": int(len(labels)),
        "accuracy": float(hits.sum() / len(labels)),
        "balanced_accuracy": float(np.mean([recall[name] for c, name in enumerate(class_names) if present[c]])),
        "macro_f1": float(f1[scored_for_f1].mean()),
        "per_class_recall": recall,
        "auroc_ovr": float(np.mean(list(auroc_per_class.values()))) if auroc_per_class else None,
        "auroc_per_class": auroc_per_class,
        "auroc_skipped": auroc_skipped,
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
    }


def bootstrap_accuracy_ci(correct, resamples: int = BOOTSTRAP_RESAMPLES, level: float = CI_LEVEL,
                          seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the accuracy, resampling the test images.

    ``correct`` is (N,) for one run or (R, N) for R runs on the same N test images (seeds of one setting): each resample
    draws N images with replacement, the same images for every run, and takes the mean accuracy over runs and images.
    So the interval is the uncertainty that comes from the finite test set; the std over seeds is the other part.
    Seeded: the same input gives the same interval.
    """
    array = np.asarray(correct, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"correct must be (N,) or (runs, N) with N > 0, got shape {array.shape}")
    samples = array.shape[1]
    per_image = array.mean(axis=0)
    rng = np.random.default_rng(seed)
    # How often each image is drawn in each resample; the resampled mean is then a weighted mean of per-image accuracy.
    draws = rng.multinomial(samples, np.full(samples, 1.0 / samples), size=resamples)
    means = draws @ per_image / samples
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def _mean_std(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": len(array)}


def aggregate(runs: list[dict]) -> dict[str, Any]:
    """Mean ± sample std (ddof=1; 0 for a single seed) over seeds per (method, mode, fraction, shots).

    A run is a flat dict: ``method``, ``mode``, ``fraction`` or ``shots`` (the other None/absent), ``seed``,
    ``weights_source`` and the keys of :func:`compute_metrics`. Refuses a group that mixes encoder weights sources (a
    random-init run must never be averaged into real results) or repeats a seed. When every run of a group carries
    ``correct`` (0/1 per test image, the same images in the same order), the group gets ``accuracy_ci95``: the
    bootstrap interval of its mean accuracy (:func:`bootstrap_accuracy_ci`); otherwise None.
    """
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        missing = [key for key in ("method", "mode", "seed", "weights_source", "accuracy") if key not in run]
        if missing:
            raise ValueError(f"run is missing {missing}: {sorted(run)}")
        key = (run["method"], run["mode"], run.get("fraction"), run.get("shots"))
        groups.setdefault(key, []).append(run)

    aggregated = []
    for (method, mode, fraction, shots), members in groups.items():
        sources = sorted({str(run["weights_source"]) for run in members})
        if len(sources) > 1:
            raise ValueError(f"{method}/{mode} fraction={fraction} shots={shots} mixes encoder weights sources {sources}: refusing to average them")
        seeds = [run["seed"] for run in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{method}/{mode} fraction={fraction} shots={shots} has repeated seeds {seeds}")
        group: dict[str, Any] = {
            "method": method, "mode": mode, "fraction": fraction, "shots": shots,
            "weights_source": sources[0], "seeds": sorted(seeds), "n_runs": len(members),
        }
        for metric in SCALAR_METRICS:
            group[metric] = _mean_std([run[metric] for run in members if run.get(metric) is not None])
        group["accuracy_ci95"] = None
        if all(run.get("correct") is not None for run in members):
            lengths = sorted({len(run["correct"]) for run in members})
            if len(lengths) > 1:
                raise ValueError(f"{method}/{mode} fraction={fraction} shots={shots} was tested on different numbers of "
                                 f"images {lengths}: the seeds of one setting must share one test set")
            group["accuracy_ci95"] = list(bootstrap_accuracy_ci([run["correct"] for run in members]))
        class_names = list(members[0].get("per_class_recall", {}))
        group["per_class_recall"] = {
            name: _mean_std([run["per_class_recall"][name] for run in members if run["per_class_recall"].get(name) is not None])
            for name in class_names
        }
        aggregated.append(group)
    aggregated.sort(key=lambda g: (g["method"], g["mode"], g["fraction"] is None, g["fraction"] or 0.0, g["shots"] or 0))
    return {
        "groups": aggregated,
        "std": "sample standard deviation over seeds (ddof=1; 0 with one seed)",
        "accuracy_ci95": f"{100 * CI_LEVEL:g} % percentile bootstrap over the test images ({BOOTSTRAP_RESAMPLES} resamples, "
                         f"seed {BOOTSTRAP_SEED}) of the accuracy averaged over the seeds",
    }


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def write_runs_csv(runs: list[dict], path: str | Path) -> Path:
    """One row per run: identity columns, scalar metrics, ``recall[<class>]`` columns, then everything else (JSON) but
    the per-image values (``correct``)."""
    if not runs:
        raise ValueError("no runs to write")
    class_names: list[str] = []
    for run in runs:
        for name in run.get("per_class_recall", {}):
            if name not in class_names:
                class_names.append(name)
    leading = [*RUN_KEYS, "n_samples", *SCALAR_METRICS]
    extra = []
    for run in runs:
        for key in run:
            if key not in leading and key != "per_class_recall" and key not in PER_IMAGE_KEYS and key not in extra:
                extra.append(key)
    columns = leading + [f"recall[{name}]" for name in class_names] + extra
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for run in runs:
            recall = run.get("per_class_recall", {})
            row = [run.get(key) for key in leading] + [recall.get(name) for name in class_names] + [run.get(key) for key in extra]
            writer.writerow([_csv_value(value) for value in row])
    return path
