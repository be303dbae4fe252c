"""What a run found, in the order a reader wants it: the headline, one compact table, the per-class results.

Pure functions over plain data: the rows of ``metrics.json["results"]`` (accuracy in %, mean ± std over seeds and the
95 % bootstrap interval, one row per method × ROI mode × training subset), the runs evaluate fitted (one per seed, with
``correct``, 0/1 per test image, and ``confusion_matrix``), the paper's numbers, and a description of the data and the
models. :func:`summarize` turns them into one JSON-able dict that evaluate stores in ``metrics.json["summary"]``; the
terminal (:func:`render_text`, the end of ``medfocus evaluate`` and ``medfocus summary``) and the HTML report both
render from that dict and from :func:`headline`, so the two never disagree with each other or with metrics.json.

Conventions:

* A row *uses the ROI* when what its method reads depends on the ROI: any method in a pixel-space or attention mode
  (``overlay``, ``blur``, ``crop``, ``attention``: the encoder saw a steered image), and the patch-token methods
  (medfocus, medfocus_dual, medfocus_select) in mode ``dual``. Mode ``none`` is the whole image, and so are the
  global-embedding methods (zero_shot, linear_probe, tip_adapter(_f), clip_fewshot) in mode ``dual``, whose global
  embedding is the whole image's: their ``none`` and ``dual`` rows are the same numbers and are shown once.
* The protocol point is the paper's 5 % of the training images; without it, the smallest evaluated fraction (without
  fractions, the smallest k-shot subset), and the headline says so.
* The ROI's effect at a training subset is the best row that uses the ROI minus the best whole-image row there (best by
  mean test accuracy over seeds, as in the table), with a paired bootstrap interval (:func:`paired_difference_ci`).
  Picking both rows by their test accuracy is the same selection on both sides; the interval does not widen for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from medfocus.pipeline.vocabulary import STEERING_MODES
from medfocus.trainer.config import METHODS, PATCH_METHODS
from medfocus.trainer.metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CI_LEVEL

PAPER_FRACTION = 0.05
PAPER_METHOD = "MedFocusCLIP"  # the paper's line set beside the best row here
WHOLE_IMAGE_MODE = "none"
# Modes in which a global-embedding method still sees the whole image (its none and dual rows are one row).
WHOLE_IMAGE_MODES_FOR_GLOBAL = ("none", "dual")
RANDOM_INIT_HEADLINE = "RANDOM-INIT: NOT REAL RESULTS."


# ---------------------------------------------------------------------------------------------------- small pieces
def subset_label(fraction: float | None, shots: int | None) -> str:
    """``5%`` for a training fraction, ``4-shot`` for k images per class (the column names everywhere)."""
    return f"{shots}-shot" if shots is not None else f"{100 * fraction:g}%"


def pct(value: float | None) -> str:
    """A percentage as every summary shows it (one decimal); ``—`` for none."""
    return "—" if value is None else f"{value:.1f}"


def signed(value: float | None) -> str:
    """A difference in percentage points, with its sign."""
    return "—" if value is None else f"{value:+.1f}"


def uses_roi(method: str, mode: str) -> bool:
    """Whether a row's numbers depend on the ROI (see the module's conventions)."""
    if mode == WHOLE_IMAGE_MODE:
        return False
    if mode == "dual":
        return method in PATCH_METHODS
    return True


def _column_order(results: list[dict]) -> list[tuple[float | None, int | None]]:
    subsets = {(row["fraction"], row["shots"]) for row in results}
    fractions = sorted(f for f, k in subsets if k is None and f is not None)
    shots = sorted(k for f, k in subsets if k is not None)
    return [(f, None) for f in fractions] + [(None, k) for k in shots]


def protocol_point(results: list[dict]) -> dict:
    """The subset the headline speaks of: 5 % when evaluated, else the smallest fraction, else the fewest shots."""
    columns = _column_order(results)
    if not columns:
        raise ValueError("no results to summarize")
    fractions = [c for c in columns if c[1] is None]
    if (PAPER_FRACTION, None) in columns:
        fraction, shots = PAPER_FRACTION, None
    elif fractions:
        fraction, shots = fractions[0]
    else:
        fraction, shots = columns[0]
    return {"column": subset_label(fraction, shots), "fraction": fraction, "shots": shots,
            "is_paper_point": fraction == PAPER_FRACTION and shots is None}


def _mean_std(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(array.mean()), 2), "std": round(float(array.std(ddof=1)) if len(array) > 1 else 0.0, 2),
            "n": len(array)}


# ---------------------------------------------------------------------------------------------------- compact table
def compact_table(results: list[dict], methods: list[str] | None = None, modes: list[str] | None = None) -> dict:
    """One row per method (and ROI mode where it matters), one column per training subset, the best per column marked.

    A global-embedding method's ``none`` and ``dual`` rows are merged into one whole-image row when their numbers are
    the same in every column (they always are: the global embedding is the whole image's in both); were they ever to
    differ, both rows stay. Rows: the trainer's methods in their order (or ``methods``), the whole image before the
    ROI modes. Each cell holds the row's accuracy mean, std and 95 % interval (%) from ``results`` unchanged, and
    ``best``: the highest mean of its column (ties all marked).
    """
    columns = _column_order(results)
    labels = [subset_label(*column) for column in columns]
    by_row: dict[tuple[str, str], dict[str, dict]] = {}
    for row in results:
        cell = {"mean": row["accuracy"], "std": row["accuracy_std"], "ci95": row.get("accuracy_ci95"),
                "seeds": row.get("seeds"), "best": False}
        by_row.setdefault((row["method"], row["mode"]), {})[subset_label(row["fraction"], row["shots"])] = cell

    def same(a: dict[str, dict], b: dict[str, dict]) -> bool:
        strip = lambda cells: {k: (c["mean"], c["std"], c["seeds"]) for k, c in cells.items()}  # noqa: E731
        return strip(a) == strip(b)

    rows = []
    merged = []
    for (method, mode), cells in by_row.items():
        partner = next((m for m in WHOLE_IMAGE_MODES_FOR_GLOBAL if m != mode), None)
        mergeable = (method not in PATCH_METHODS and mode in WHOLE_IMAGE_MODES_FOR_GLOBAL
                     and (method, partner) in by_row and same(cells, by_row[(method, partner)]))
        if mergeable:
            if mode != WHOLE_IMAGE_MODES_FOR_GLOBAL[0]:
                continue  # the pair appears once, as the first mode's row
            merged.append(method)
            rows.append({"method": method, "mode": None, "modes": list(WHOLE_IMAGE_MODES_FOR_GLOBAL), "uses_roi": False,
                         "label": method, "cells": cells})
        else:
            roi = uses_roi(method, mode)
            suffix = f"ROI: {mode}" if roi else "whole image" if mode == WHOLE_IMAGE_MODE else f"whole image ({mode})"
            rows.append({"method": method, "mode": mode, "modes": [mode], "uses_roi": roi, "label": f"{method}, {suffix}",
                         "cells": cells})

    method_order = list(methods or []) + [m for m in METHODS if m not in (methods or [])]
    mode_order = list(modes or []) + [m for m in STEERING_MODES if m not in (modes or [])]

    def order(row: dict) -> tuple:
        method = row["method"]
        position = method_order.index(method) if method in method_order else len(method_order)
        mode_rank = -1 if row["mode"] is None else (mode_order.index(row["mode"]) if row["mode"] in mode_order else len(mode_order))
        return position, method, row["uses_roi"], mode_rank, row["mode"] or ""

    rows.sort(key=order)
    for label in labels:
        means = [row["cells"][label]["mean"] for row in rows if label in row["cells"] and row["cells"][label]["mean"] is not None]
        if means:
            top = max(means)
            for row in rows:
                cell = row["cells"].get(label)
                if cell is not None and cell["mean"] == top:
                    cell["best"] = True
    return {"columns": labels, "subsets": [list(column) for column in columns], "rows": rows, "merged": sorted(merged)}


def paper_rows(paper: dict[str, dict[float, float]] | None, columns: list[str]) -> list[dict]:
    """The paper's lines in the table's columns (a column the paper does not report is None)."""
    if not paper:
        return []
    rows = []
    for label, by_fraction in paper.items():
        cells = {subset_label(float(fraction), None): value for fraction, value in by_fraction.items()}
        rows.append({"label": f"{label} (paper)", "method": label, "cells": {column: cells.get(column) for column in columns}})
    return rows


# ---------------------------------------------------------------------------------------------------- intervals
def paired_difference_ci(a, b, resamples: int = BOOTSTRAP_RESAMPLES, level: float = CI_LEVEL,
                         seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95 % interval of mean accuracy(a) − mean accuracy(b), in percentage points, by a paired two-level bootstrap.

    ``a`` and ``b`` are (S, N): 0/1 per test image for S seeds of two rows, seed ``s`` of ``a`` paired with seed ``s``
    of ``b`` (a seed fixes the training subset, the same for both rows) and the same N test images in the same order.
    Each resample draws S seeds with replacement and N test images with replacement, the same seeds and images for both
    rows, and takes the difference of the two rows' accuracy averaged over the drawn seeds and images; the interval is
    the percentile interval of those differences. So it holds both the test-set uncertainty (the per-row intervals'
    part) and the seed-to-seed spread of the training subsets, and pairing removes what the two rows share. With one
    seed it is the paired bootstrap over the test images alone. Seeded: the same input gives the same interval.
    """
    first = np.asarray(a, dtype=np.float64)
    second = np.asarray(b, dtype=np.float64)
    if first.ndim == 1:
        first, second = first[None, :], second[None, :]
    if first.shape != second.shape or first.ndim != 2 or first.shape[1] == 0 or first.shape[0] == 0:
        raise ValueError(f"the two rows must be (seeds, images) of one shape with images > 0, got {first.shape} and {second.shape}")
    seeds, images = first.shape
    difference = first - second  # (S, N)
    rng = np.random.default_rng(seed)
    seed_weights = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=resamples) / seeds  # (R, S)
    image_weights = rng.multinomial(images, np.full(images, 1.0 / images), size=resamples) / images  # (R, N)
    resampled = np.einsum("rn,rn->r", seed_weights @ difference, image_weights)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return round(100.0 * float(low), 2) + 0.0, round(100.0 * float(high), 2) + 0.0  # + 0.0: no "-0.0"


def _runs_of(runs: list[dict], method: str, modes: list[str], fraction, shots) -> dict[int, dict]:
    """The runs of one table row at one subset, by seed (a merged row: its first mode's runs)."""
    for mode in modes:
        found = {run["seed"]: run for run in runs
                 if (run["method"], run["mode"], run.get("fraction"), run.get("shots")) == (method, mode, fraction, shots)}
        if found:
            return found
    return {}


def _best(rows: list[dict], column: str) -> list[dict]:
    """The rows with the highest mean in ``column`` (several on a tie), in table order."""
    present = [row for row in rows if column in row["cells"] and row["cells"][column]["mean"] is not None]
    if not present:
        return []
    top = max(row["cells"][column]["mean"] for row in present)
    return [row for row in present if row["cells"][column]["mean"] == top]


def _row_ref(row: dict, column: str) -> dict:
    cell = row["cells"][column]
    return {"label": row["label"], "method": row["method"], "mode": row["mode"], "accuracy": cell["mean"],
            "accuracy_std": cell["std"], "accuracy_ci95": cell["ci95"], "seeds": cell["seeds"]}


def roi_effect(table: dict, runs: list[dict]) -> dict:
    """Per training subset: the best ROI-using row minus the best whole-image row, with a paired 95 % interval.

    ``difference`` is the difference of the two rows' accuracy in ``table`` (so it equals metrics.json's numbers);
    ``ci95`` comes from :func:`paired_difference_ci` over the seeds the two rows share, or is None when the runs carry
    no per-image results. ``verdict`` per subset: ``helps`` when the interval lies above 0, ``hurts`` below, else
    ``unclear``. When no row uses the ROI, or none sees the whole image, ``why`` says so and there are no subsets.
    """
    rows = table["rows"]
    roi_rows = [row for row in rows if row["uses_roi"]]
    whole_rows = [row for row in rows if not row["uses_roi"]]
    if not roi_rows:
        return {"why": "no evaluated row uses the ROI (add an ROI mode such as dual to evaluate.modes)", "by_column": []}
    if not whole_rows:
        return {"why": "no evaluated row sees the whole image (add mode none to evaluate.modes)", "by_column": []}
    columns_of = {label: tuple(subset) for label, subset in zip(table["columns"], table["subsets"])}
    out = []
    for label in table["columns"]:
        best_roi, best_whole = _best(roi_rows, label), _best(whole_rows, label)
        if not best_roi or not best_whole:
            continue
        roi_row, whole_row = best_roi[0], best_whole[0]
        fraction, shots = columns_of[label]
        roi_runs = _runs_of(runs, roi_row["method"], roi_row["modes"], fraction, shots)
        whole_runs = _runs_of(runs, whole_row["method"], whole_row["modes"], fraction, shots)
        shared = sorted(set(roi_runs) & set(whole_runs))
        interval = None
        if shared and all(roi_runs[s].get("correct") is not None and whole_runs[s].get("correct") is not None for s in shared):
            interval = list(paired_difference_ci([roi_runs[s]["correct"] for s in shared], [whole_runs[s]["correct"] for s in shared]))
        difference = round(roi_row["cells"][label]["mean"] - whole_row["cells"][label]["mean"], 2) + 0.0
        verdict = "unclear" if interval is None or interval[0] <= 0.0 <= interval[1] else ("helps" if interval[0] > 0 else "hurts")
        out.append({"column": label, "fraction": fraction, "shots": shots, "roi": _row_ref(roi_row, label), "whole": _row_ref(whole_row, label),
                    "difference": difference, "ci95": interval, "paired_seeds": shared, "verdict": verdict})
    return {"why": None, "by_column": out,
            "interval": "paired bootstrap over seeds and test images (the same seeds and images for both rows), "
                        f"{BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}"}


# ---------------------------------------------------------------------------------------------------- per class
def sensitivity_specificity(confusion) -> list[dict]:
    """Per class of a confusion matrix (rows: true class, columns: predicted): sensitivity = TP/(TP+FN) and
    specificity = TN/(TN+FP), one-vs-rest; None where the class has no positives (or no negatives) in the test set."""
    matrix = np.asarray(confusion, dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {matrix.shape}")
    total = int(matrix.sum())
    out = []
    for c in range(matrix.shape[0]):
        tp = int(matrix[c, c])
        fn = int(matrix[c].sum()) - tp
        fp = int(matrix[:, c].sum()) - tp
        tn = total - tp - fn - fp
        out.append({"tp": tp, "fn": fn, "fp": fp, "tn": tn,
                    "sensitivity": tp / (tp + fn) if tp + fn else None,
                    "specificity": tn / (tn + fp) if tn + fp else None})
    return out


def per_class(runs: list[dict], chosen: dict) -> dict | None:
    """Sensitivity and specificity per class (%, mean ± std over seeds) of the row fixed in advance, and its confusion
    matrix summed over those seeds (every seed tests the same images, so the summed matrix gives the same means).

    ``chosen`` names the row (method, mode, fraction, shots) and why it (``chosen_by``): the train section's method
    and mode, never picked by test accuracy. None when no run matches.
    """
    key = (chosen["method"], chosen["mode"], chosen.get("fraction"), chosen.get("shots"))
    members = sorted((run for run in runs if (run["method"], run["mode"], run.get("fraction"), run.get("shots")) == key),
                     key=lambda run: run["seed"])
    if not members:
        return None
    names = list(members[0]["class_names"])
    per_seed = [sensitivity_specificity(run["confusion_matrix"]) for run in members]
    pooled = np.sum([np.asarray(run["confusion_matrix"], dtype=np.int64) for run in members], axis=0)
    classes = []
    for c, name in enumerate(names):
        sensitivities = [100.0 * seed[c]["sensitivity"] for seed in per_seed if seed[c]["sensitivity"] is not None]
        specificities = [100.0 * seed[c]["specificity"] for seed in per_seed if seed[c]["specificity"] is not None]
        classes.append({"name": name, "test_images": int(np.asarray(members[0]["confusion_matrix"])[c].sum()),
                        "sensitivity": _mean_std(sensitivities), "specificity": _mean_std(specificities)})
    return {"method": chosen["method"], "mode": chosen["mode"], "fraction": chosen.get("fraction"), "shots": chosen.get("shots"),
            "column": subset_label(chosen.get("fraction"), chosen.get("shots")), "chosen_by": chosen.get("chosen_by"),
            "seeds": [run["seed"] for run in members], "classes": classes, "class_names": names,
            "confusion_matrix_summed": pooled.tolist()}


# ---------------------------------------------------------------------------------------------------- the summary
def random_init_parts(models: dict) -> list[str]:
    """Which models behind the numbers had no trained weights, as the headline names them."""
    parts = []
    encoder, segmenter = models.get("encoder") or {}, models.get("segmenter") or {}
    if encoder.get("random_init"):
        parts.append(f"the image encoder ({encoder.get('name', '?')})")
    if segmenter.get("random_init"):
        parts.append(f"the segmenter ({segmenter.get('name', '?')})")
    return parts


def summarize(results: list[dict], runs: list[dict], *, dataset: dict, models: dict,
              paper: dict[str, dict[float, float]] | None, paper_datasets: list[str], chosen: dict | None,
              roi_quality: dict | None = None, methods: list[str] | None = None, modes: list[str] | None = None,
              skipped: dict[str, str] | None = None, external: dict | None = None) -> dict:
    """Everything the headline, the compact table and the per-class section show, as one JSON-able dict.

    ``results``: metrics.json's rows (% values); ``runs``: evaluate's runs (``correct`` per test image for the ROI
    effect's interval, ``confusion_matrix`` and ``class_names`` for the per-class section); ``dataset``: ``name``,
    ``images``, ``train_images``, ``test_images``, ``classes`` ([{name, train, test}]); ``models``: ``encoder`` and
    ``segmenter``, each {name, weights, sha256, random_init} (the segmenter also ``policy``); ``paper``: the paper's
    {line: {fraction: accuracy %}} for this dataset or None; ``chosen``: the per-class row (see :func:`per_class`);
    ``roi_quality``: {dice, iou, n, truth} of the automatic ROI against ground-truth masks, where they exist;
    ``skipped``: {"method/mode": reason} of the fits that could not run (a method with no row at all is named);
    ``external``: metrics.json's ``external`` (per external test set; the rows then carry ``external``), see
    :func:`external_comparison`.
    """
    table = compact_table(results, methods, modes)
    point = protocol_point(results)
    best_rows = _best(table["rows"], point["column"])
    best = _row_ref(best_rows[0], point["column"]) | {"tied_with": [row["label"] for row in best_rows[1:]]} if best_rows else None
    comparison: dict[str, Any] = {"reported": bool(paper), "covered": list(paper_datasets), "column": point["column"]}
    if paper:
        at = {label: by_fraction.get(point["fraction"]) for label, by_fraction in paper.items() if point["shots"] is None}
        comparison["values"] = {label: value for label, value in at.items() if value is not None}
        reference = comparison["values"].get(PAPER_METHOD)
        comparison["reference"] = PAPER_METHOD if reference is not None else None
        comparison["difference"] = None if reference is None or best is None else round(best["accuracy"] - reference, 2)
        comparison["paper_fractions"] = sorted({float(f) for by_fraction in paper.values() for f in by_fraction})
    return {
        "random_init": random_init_parts(models),
        "dataset": dataset,
        "models": models,
        "roi_quality": roi_quality,
        "protocol_point": point,
        "best": best,
        "roi_effect": roi_effect(table, runs),
        "paper": comparison,
        "table": table,
        "paper_rows": paper_rows(paper, table["columns"]),
        "per_class": per_class(runs, chosen) if chosen else None,
        "not_run": _not_run(skipped or {}, results),
        "external": external_comparison(table, results, external),
    }


def external_comparison(table: dict, results: list[dict], external: dict | None) -> dict | None:
    """Internal beside external accuracy, per external test set: the compact table's rows and columns, each cell the
    row's internal test accuracy and its accuracy on the external set (the same fits; mean ± std over seeds, 95 %
    bootstrap intervals over each set's images) and their difference; with a groups file, also the accuracy within
    each group (and the set's ``groups``: the file and the images per group and class). None without external sets."""
    if not external:
        return None
    by_key = {(r["method"], r["mode"], subset_label(r["fraction"], r["shots"])): r for r in results}
    sets = {}
    for name, meta in external.items():
        rows = []
        for row in table["rows"]:
            mode = row["mode"] if row["mode"] is not None else row["modes"][0]
            cells = {}
            for column in table["columns"]:
                result = by_key.get((row["method"], mode, column))
                if result is None:
                    continue
                scores = result.get("external", {}).get(name) or {}
                outside = scores.get("accuracy")
                cells[column] = {"internal": result["accuracy"], "internal_ci95": result.get("accuracy_ci95"),
                                 "external": outside, "external_std": scores.get("accuracy_std"),
                                 "external_ci95": scores.get("accuracy_ci95"),
                                 "difference": None if outside is None else round(outside - result["accuracy"], 2),
                                 **({"groups": {group: {key: value[key] for key in ("accuracy", "accuracy_ci95", "recall")}
                                                for group, value in scores["groups"].items()}} if "groups" in scores else {})}
            rows.append({"label": row["label"], "method": row["method"], "mode": mode, "uses_roi": row["uses_roi"],
                         "cells": cells})
        copies = meta.get("copies_of_training_source", {})
        sets[name] = {"images": meta.get("images"), "classes": meta.get("classes"), "class_map": meta.get("class_map"),
                      "unmapped_training_classes": meta.get("unmapped_training_classes", []),
                      "copies_removed": {"byte": copies.get("byte_copies", 0), "near": copies.get("near_copies", 0)},
                      "rows": rows, **({"groups": meta["groups"]} if meta.get("groups") else {})}
    return {"columns": table["columns"], "sets": sets}


def transfer_at_best(summary: dict) -> dict[str, dict]:
    """Per external set, the headline's best row (chosen on the internal test set) at the protocol point: its internal
    and external accuracy, the external interval and the difference."""
    external, best = summary.get("external"), summary.get("best")
    if not external or not best:
        return {}
    column = summary["protocol_point"]["column"]
    out = {}
    for name, item in external["sets"].items():
        row = next((r for r in item["rows"] if r["label"] == best["label"]), None)
        cell = (row or {}).get("cells", {}).get(column)
        if cell and cell["external"] is not None:
            out[name] = cell | {"label": best["label"], "images": item["images"], "copies_removed": item["copies_removed"]}
    return out


def _not_run(skipped: dict[str, str], results: list[dict]) -> dict[str, str]:
    """Methods with no row at all, and why (the first clause of the first reason)."""
    present = {row["method"] for row in results}
    out: dict[str, str] = {}
    for key, reason in skipped.items():
        method = key.split("/")[0]
        if method not in present and method not in out:
            out[method] = reason.split(";")[0].strip()
    return out


def flat_headline(summary: dict) -> dict:
    """The headline's numbers as nested dicts of scalars (no lists): what ``dvc metrics show`` / ``diff`` print."""
    best, effect, paper = summary["best"], summary["roi_effect"], summary["paper"]
    flat: dict[str, Any] = {"random_init": bool(summary["random_init"]), "subset": summary["protocol_point"]["column"]}
    if best:
        ci = best["accuracy_ci95"] or [None, None]
        flat["best"] = {"row": best["label"], "accuracy": best["accuracy"], "std": best["accuracy_std"],
                        "ci95_low": ci[0], "ci95_high": ci[1]}
    flat["roi_effect"] = {e["column"]: {"points": e["difference"], "ci95_low": (e["ci95"] or [None])[0],
                                        "ci95_high": (e["ci95"] or [None, None])[1]} for e in effect["by_column"]}
    if paper.get("difference") is not None:
        flat["vs_paper"] = {"paper": paper["values"][paper["reference"]], "points": paper["difference"]}
    if summary.get("roi_quality"):
        flat["roi_dice"] = summary["roi_quality"]["dice"]
    for name, cell in transfer_at_best(summary).items():
        ci = cell["external_ci95"] or [None, None]
        flat.setdefault("external", {})[name] = {"accuracy": cell["external"], "internal": cell["internal"],
                                                 "points": cell["difference"], "ci95_low": ci[0], "ci95_high": ci[1]}
    return flat


# ---------------------------------------------------------------------------------------------------- words
def _interval(ci: list[float] | None, sign: bool = False) -> str:
    if ci is None:
        return "no interval"
    show = signed if sign else pct
    return f"95 % CI {show(ci[0])} to {show(ci[1])}"


def context_lines(summary: dict) -> list[tuple[str, str]]:
    """(what, text) lines before the headline: the data, the models (with their weights, once), the ROI's quality."""
    data, models = summary["dataset"], summary["models"]
    classes = ", ".join(f"{c['name']} {c['train'] + c['test']}" for c in data.get("classes", []))
    lines = [("data", f"{data['name']}: {data['images']} images in {len(data.get('classes', []))} classes ({classes}); "
                      f"{data['train_images']} for training, {data['test_images']} held out for testing")]
    encoder, segmenter = models.get("encoder") or {}, models.get("segmenter") or {}

    def weights(model: dict) -> str:
        sha = model.get("sha256")
        # an encoder bank's is every encoder's, joined by '+'
        short = f", sha256 {'+'.join(part[:12] for part in sha.split('+'))}" if sha and sha != "random-init" else ""
        return f"{model.get('weights')}{short}"

    used = (f"segmenter {segmenter.get('name')} ({weights(segmenter)}), ROI policy {segmenter.get('policy')}" if segmenter
            else "no segmenter (no evaluated mode uses an ROI)")
    lines.append(("models", f"encoder {encoder.get('name')} ({weights(encoder)}); {used}"))
    quality = summary.get("roi_quality")
    if quality:
        lines.append(("ROI", f"the automatic ROI against {quality['n']} ground-truth masks ({quality['truth']}): "
                             f"Dice {quality['dice']:.2f}, IoU {quality['iou']:.2f}"))
    else:
        lines.append(("ROI", "no ground-truth masks for this dataset: the ROI's quality is not measured"))
    return lines


def headline(summary: dict) -> list[str]:
    """The sentences a reader came for, random-init first when it applies: the best method at the protocol point with
    its interval, the ROI's effect per training subset with intervals, and the comparison with the paper."""
    sentences = []
    if summary["random_init"]:
        named = " and ".join(summary["random_init"])
        sentences.append(f"{RANDOM_INIT_HEADLINE} {named[:1].upper()}{named[1:]} had no pretrained "
                         "weights and ran with random initialisation: every number below measures the pipeline, not the method.")
    point, best = summary["protocol_point"], summary["best"]
    where = (f"At {point['column']} of the training images (the paper's protocol point)" if point["is_paper_point"] else
             f"At {point['column']} (the smallest evaluated subset; the paper's 5 % was not evaluated)")
    if best is None:
        sentences.append(f"{where} no method has a result.")
    else:
        tied = f" (tied with {', '.join(best['tied_with'])})" if best["tied_with"] else ""
        sentences.append(f"{where}, the best is {best['label']}{tied}: {pct(best['accuracy'])} ± {pct(best['accuracy_std'])} % "
                         f"accuracy over {best['seeds']} seed(s), {_interval(best['accuracy_ci95'])} %.")
    effect = summary["roi_effect"]
    if effect["why"] or not effect["by_column"]:
        sentences.append(f"The ROI's effect is not measured: {effect['why'] or 'no subset has both kinds of row'}.")
    else:
        verdicts = {v: [e["column"] for e in effect["by_column"] if e["verdict"] == v] for v in ("helps", "hurts", "unclear")}
        columns = len(effect["by_column"])
        parts = []
        for verdict, words in (("helps", "helps"), ("hurts", "hurts"), ("unclear", "makes no clear difference")):
            if verdicts[verdict]:
                every = "at any subset" if verdict == "unclear" else "at every subset"
                parts.append(f"{words} {every if len(verdicts[verdict]) == columns else 'at ' + ', '.join(verdicts[verdict])}")
        numbers = [f"{signed(e['difference'])} points at {e['column']} ({_interval(e['ci95'], sign=True)})" if i == 0 else
                   f"{signed(e['difference'])} at {e['column']} ({'no interval' if e['ci95'] is None else signed(e['ci95'][0]) + ' to ' + signed(e['ci95'][1])})"
                   for i, e in enumerate(effect["by_column"])]
        listed = numbers[0] if len(numbers) == 1 else f"{', '.join(numbers[:-1])} and {numbers[-1]}"
        sentences.append(f"Focusing on the ROI {' and '.join(parts)}: the best row with the ROI minus the best whole-image row "
                         f"is {listed}.")
    transfer = transfer_at_best(summary)
    if transfer:
        parts = [f"{pct(cell['external'])} ± {pct(cell['external_std'])} % on {name} ({_interval(cell['external_ci95'])} %; "
                 f"{cell['images']} images from another source, after removing {cell['copies_removed']['byte']} byte and "
                 f"{cell['copies_removed']['near']} near-copies of training images), {signed(cell['difference'])} points "
                 "from the internal test set" for name, cell in transfer.items()]
        sentences.append(f"Transfer to an external test set (never used for training or any choice): the best row at "
                         f"{point['column']} ({best['label']}, {pct(best['accuracy'])} % internally) reaches "
                         f"{' and '.join(parts)}.")
    paper = summary["paper"]
    dataset = summary["dataset"]["name"]
    if not paper["reported"]:
        sentences.append(f"The paper (MedFocusCLIP, Arora & Namboodiri) reports no numbers for {dataset}; it covers "
                         f"{', '.join(paper['covered'])}.")
    elif not paper.get("values"):
        reported = ", ".join(subset_label(f, None) for f in paper.get("paper_fractions", []))
        sentences.append(f"The paper reports {dataset} at {reported} only, not at {paper['column']}.")
    else:
        # The paper gives its CLIP line at 5 % only, read off a figure: approximately.
        others = [f"{label}{' about' if label == 'CLIP' else ''} {pct(value)} %" for label, value in paper["values"].items()
                  if label != paper["reference"]]
        lead = (f"The paper reports {paper['reference']} at {pct(paper['values'][paper['reference']])} % on {dataset} at {paper['column']}"
                if paper["reference"] else f"The paper reports {dataset} at {paper['column']}")
        extra = f" ({'; '.join(others)})" if others else ""
        if paper.get("difference") is not None:
            sentences.append(f"{lead}{extra}; the best row here is {signed(paper['difference'])} points from it.")
        else:
            sentences.append(f"{lead}{extra}.")
    return sentences


def _text_table(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> list[str]:
    """Plain-text columns: the ``left`` columns (labels) left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    fmt = lambda cells: "  ".join(str(cell).ljust(width) if i in left else str(cell).rjust(width)  # noqa: E731
                                  for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()
    return [fmt(header), *(fmt(row) for row in rows)]


def cell_text(cell: dict | None) -> str:
    if cell is None or cell["mean"] is None:
        return "—"
    return f"{pct(cell['mean'])} ± {pct(cell['std'])}" + (" *" if cell["best"] else "")


def external_cell_text(cell: dict | None) -> str:
    """``internal | external`` of one cell of :func:`external_comparison`."""
    if cell is None:
        return "—"
    return f"{pct(cell['internal'])} | {pct(cell['external'])}"


def render_text(summary: dict, metrics_path: str | None = None) -> str:
    """The terminal summary: context, headline, the compact table, the per-class results; plain text, no colour."""
    out = []
    title = f"medfocus: {summary['dataset']['name']}"
    out += [title, "=" * len(title)]
    for what, text in context_lines(summary):
        out.append(f"{what:7s} {text}")
    out.append("")
    out += [f"{number}. {sentence}" if not sentence.startswith(RANDOM_INIT_HEADLINE) else f"!! {sentence}"
            for number, sentence in enumerate(headline(summary), start=0 if summary["random_init"] else 1)]
    table = summary["table"]
    out += ["", "test accuracy % (mean ± std over seeds; * best per column)"]
    rows = [[row["label"], *(cell_text(row["cells"].get(column)) for column in table["columns"])] for row in table["rows"]]
    rows += [[row["label"], *(pct(row["cells"].get(column)) for column in table["columns"])] for row in summary["paper_rows"]]
    out += _text_table(["method", *table["columns"]], rows)
    if table["merged"]:
        out.append(f"({', '.join(table['merged'])}: the global embedding is the whole image's in modes none and dual; "
                   "their identical rows are shown once)")
    for method, reason in summary.get("not_run", {}).items():
        out.append(f"(not run: {method}: {reason})")
    effect = summary["roi_effect"]
    if effect["by_column"]:
        out += ["", "the ROI's effect: best row with the ROI minus best whole-image row, in points",
                f"(95 % CI: {effect['interval']})"]
        out += _text_table(["subset", "with the ROI", "%", "whole image", "%", "difference", "95 % CI"],
                           [[e["column"], e["roi"]["label"], pct(e["roi"]["accuracy"]), e["whole"]["label"], pct(e["whole"]["accuracy"]),
                             signed(e["difference"]), "—" if e["ci95"] is None else f"{signed(e['ci95'][0])} to {signed(e['ci95'][1])}"]
                            for e in effect["by_column"]], left=(0, 1, 3))
    external = summary.get("external")
    for name, item in ((external or {}).get("sets") or {}).items():
        out += ["", f"internal | external test accuracy % on {name} ({item['images']} images; mean over seeds; the same fits)"]
        out += _text_table(["method", *external["columns"]],
                           [[row["label"], *(external_cell_text(row["cells"].get(column)) for column in external["columns"])]
                            for row in item["rows"]])
    classes = summary.get("per_class")
    if classes:
        out += ["", f"per class: {classes['method']} ({classes['mode']}) at {classes['column']}, over {len(classes['seeds'])} seed(s) "
                    f"— chosen in advance: {classes['chosen_by']}"]
        out += _text_table(["class", "test images", "sensitivity %", "specificity %"],
                           [[c["name"], str(c["test_images"]), f"{pct(c['sensitivity']['mean'])} ± {pct(c['sensitivity']['std'])}",
                             f"{pct(c['specificity']['mean'])} ± {pct(c['specificity']['std'])}"] for c in classes["classes"]])
    if metrics_path:
        out += ["", f"all runs and metrics: {metrics_path}"]
    return "\n".join(out) + "\n"

