"""The report stage: one HTML page per dataset, ``cache/<dataset>/report/index.html``, with its pictures beside it.

It opens with the answer (rendered from ``metrics.json["summary"]`` by :mod:`medfocus.pipeline.results_summary`, like
the terminal summary): the data, the models, the ROI's quality and three sentences (the best method at 5 % with its
interval, the ROI's effect per training subset, the paper), then one compact table and the per-class results of the
method fixed in advance. Then every row next to the paper's numbers (folded), the accuracy-vs-fraction plot, the
confusion matrix, a gallery of the ROIs the segmenter chose, the fusion attention of the trained head on test
images, and the provenance of every number: where the weights came from (a loud red banner when any model is
random-init), the model, package versions, params and the keys of the stores the results were read from. It only reads what the
earlier stages wrote; it runs no segmenter and no encoder. ``cache/<dataset>/report.json`` holds the headline
numbers in a flat form for ``dvc metrics``.
"""

from __future__ import annotations

import dataclasses
import html
import json
import shutil
from pathlib import Path

import yaml
from medfocus.pipeline.cached_features import load_cached_features
from medfocus.pipeline.config import Params
from medfocus.pipeline.current_stores import current_feature_store, current_mask_store, resolve_features_for
from medfocus.pipeline.datasets import DatasetSpec, class_file_key
from medfocus.pipeline.featurize import encoder_input, encoder_view, shared_encoder, steer
from medfocus.pipeline.gallery import pick_examples, write_gallery, write_near_duplicate_gallery
from medfocus.pipeline.images import load_image
from medfocus.pipeline.manifest import write_atomic, write_json
from medfocus.pipeline.paper import paper_datasets, paper_results
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.preparation import PreparedDataset, load_prepared
from medfocus.pipeline.provenance import RANDOM_INIT, is_random_init, package_versions
from medfocus.pipeline.results_summary import (
    RANDOM_INIT_HEADLINE,
    cell_text,
    context_lines,
    external_cell_text,
    flat_headline,
    headline,
    pct,
    signed,
)
from medfocus.pipeline.stage_outputs import run_file
from medfocus.pipeline.vocabulary import STEERING_MODES
from medfocus.pipeline.trained_heads import HeadRequest, load_head
from medfocus.trainer import METHODS, fusion_attention
from medfocus.trainer.plots import plot_attention_overlay

REPORT_PAGE = "index.html"
ACCURACY_PLOT = "accuracy_vs_fraction.png"
CONFUSION_PLOT = "confusion_matrix.png"
ROI_GALLERY = "roi_gallery.png"
NEAR_DUPLICATE_GALLERY = "near_duplicates.png"
PAPER_FRACTION = 0.05
# Our methods that correspond to the paper's two lines (MedFocusCLIP; CLIP after few-shot training), shown beside them.
PAPER_COUNTERPARTS = ("medfocus", "medfocus_dual", "medfocus_select", "clip_fewshot")


def report_summary_path(paths: DatasetPaths) -> Path:
    return paths.dir / "report.json"


class ReportInputMissingError(FileNotFoundError):
    """An earlier stage has not written what the report shows."""


def _read_stage_output(path: Path, dataset: str, command: str) -> dict:
    """A stage's output; for per-image stages its content file merged with how its last run went (if recorded)."""
    if not path.exists():
        raise ReportInputMissingError(f"no {path.name} for {dataset!r} yet: run `medfocus {command} --dataset {dataset}` first")
    output = read_json(path)
    run = run_file(path)
    if command in ("segment", "features") and run.exists():
        ran = read_json(run)
        modes = {mode: entry | ran.get("modes", {}).get(mode, {}) for mode, entry in output.get("modes", {}).items()}
        output = output | ran | ({"modes": modes} if modes else {})
    return output


def subset_label(fraction: float | None, shots: int | None) -> str:
    return f"{shots}-shot" if shots is not None else f"{100 * fraction:g}%"


# ---------------------------------------------------------------------------------------------------- pictures
def write_attention_overlays(spec: DatasetSpec, prepared: PreparedDataset, params: Params, paths: DatasetPaths,
                             out_dir: Path, count: int) -> tuple[list[dict], dict]:
    """The trained head's fusion attention on up to ``count`` test images (one per class in turn).

    Returns one record per picture and the identity of the head shown. The picture is the image as the encoder
    saw it (steered by the ROI mode, fitted into its input) with the ROI share and the attention of the predicted class
    per patch; a head that is not a medfocus fusion head has no attention, and its panel shows the ROI share.
    """
    settings = params.train
    store = current_feature_store(spec, params, paths, settings.mode)
    cached = load_cached_features(prepared, store)
    request = HeadRequest.from_settings(settings)
    model, head_file = load_head(paths, request, store, settings, prepared)
    features_spec = resolve_features_for(spec, params, prepared, [settings.mode], paths)
    store_spec = features_spec.stores[settings.mode]
    encoder = shared_encoder(features_spec.encoder.build)
    steering = store_spec.content["steering"]
    masks = current_mask_store(spec, params, paths) if store_spec.mask_store_key else None

    row_of = {digest: row for row, digest in enumerate(cached.features.hashes)}
    test_hashes = {cached.features.hashes[row] for row in cached.splits["test"]}
    test_only = dataclasses.replace(prepared, entries=[e for e in prepared.entries if e.hash in test_hashes])
    records = []
    for number, entry in enumerate(pick_examples(test_only, test_hashes, count), start=1):
        row = row_of[entry.hash]
        one = cached.features.subset([row])
        probabilities = model.predict_proba(one)[0]
        predicted = int(probabilities.argmax())
        roi_weights = cached.features.roi_weights[row]
        if model.method == "medfocus":
            attention, panel = fusion_attention(model, one)[0, predicted], "fusion attention"
        else:
            attention, panel = roi_weights, f"no attention ({model.method} head): ROI share"
        image = encoder_input(load_image(prepared.image_path(entry)), store_spec.content["intensity"])
        roi, labels = masks.read_masks(entry.hash) if masks is not None else (None, None)
        steered, _ = steer(image, roi, labels, settings.mode, steering, encoder)
        view = encoder_view(encoder, steered)
        predicted_name = prepared.class_names[predicted]
        name = f"attention_{number}_{class_file_key(entry.label)}.png"  # a class name may hold any letter
        title = (f"true {entry.label}, predicted {predicted_name} ({100 * float(probabilities[predicted]):.1f}%) — "
                 f"{model.method}/{settings.mode}, {panel}, encoder {cached.weights_source}")
        plot_attention_overlay(view, roi_weights, attention, out_dir / name, title, grid=encoder.grid)
        records.append({"file": name, "image": entry.path, "true": entry.label, "predicted": predicted_name,
                        "probability": round(float(probabilities[predicted]), 4)})
    head = {"file": str(head_file), "method": model.method, "mode": settings.mode,
            "subset": subset_label(request.fraction, request.shots), "seed": settings.seed, "feature_store_key": cached.store_key,
            "lambda": model.config.lambda_, "epochs": model.config.epochs}
    return records, head


# ---------------------------------------------------------------------------------------------------- html
def _e(value) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list], classes: list[str] | None = None, table_class: str | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{classes[index]}"' if classes and classes[index] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{_e('—' if v is None else v)}</td>" for v in row) + "</tr>")
    table = f'<table class="{table_class}">' if table_class else "<table>"
    return f"{table}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(file: str, caption: str) -> str:
    return f'<figure><img src="{_e(file)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _percent(value) -> str | None:
    return None if value is None else f"{value:.2f}"


def random_init_parts(segment_summary: dict, features_summary: dict, metrics: dict) -> list[str]:
    """Which models behind these numbers had no trained weights."""
    parts = []
    if features_summary.get("random_init") or metrics.get("random_init") or is_random_init(features_summary.get("weights_source", "")):
        parts.append(f"the image encoder ({features_summary.get('encoder', {}).get('model', '?')})")
    if segment_summary.get("random_init"):
        parts.append(f"the segmenter ({segment_summary.get('spec', {}).get('backend', '?')})")
    return parts


def _banner(parts: list[str]) -> str:
    if not parts:
        return ""
    return (
        '<div class="banner"><strong>RANDOM-INIT: NOT REAL RESULTS.</strong> '
        f"{_e(' and '.join(parts))} had no pretrained weights here and ran with random initialisation. Every number "
        "and picture on this page measures the pipeline, not the method. Provide the weights (see the README: "
        "pretrained weights) and rerun <code>dvc repro</code>.</div>"
    )


def _ci(row: dict) -> str | None:
    interval = row.get("accuracy_ci95")
    return None if interval is None else f"{interval[0]:.1f}–{interval[1]:.1f}"


def _left_out_note(metrics: dict) -> str:
    images = metrics.get("images")
    if not images or not (images["test_images_left_out"] or images["train_images_left_out"]):
        return ""
    return (f" {images['test_images_left_out']} test and {images['train_images_left_out']} training image(s) lack features "
            f"in some evaluated mode and are left out of every mode, so all modes are compared on the same images.")


def results_section(metrics: dict, dataset: str) -> str:
    """Every row of ``metrics.json`` (accuracy with its interval, balanced accuracy, macro-F1, AUROC, sensitivity per
    class) beside the authors' table for ``dataset`` (or why there is none), folded under a ``<details>``: the
    headline and the compact table come first. The encoder's weights get a column only when rows differ in them."""
    sources = sorted({str(r.get("weights_source")) for r in metrics["results"]})
    class_names = list(dict.fromkeys(name for r in metrics["results"] for name in r.get("sensitivity", {})))
    external = list(metrics.get("external") or {})  # each external test set's accuracy beside the internal one

    def outside(r: dict, name: str) -> list:
        cell = r.get("external", {}).get(name)
        if not cell:
            return [None, None]
        return [f"{cell['accuracy']:.2f} ± {cell['accuracy_std']:.2f}", _ci(cell)]

    rows, classes = [], []
    for r in sorted(metrics["results"], key=_row_order):
        rows.append([r["method"], r["mode"], subset_label(r["fraction"], r["shots"]),
                     f"{r['accuracy']:.2f} ± {r['accuracy_std']:.2f}", _ci(r),
                     *(value for name in external for value in outside(r, name)), _percent(r["balanced_accuracy"]),
                     _percent(r["macro_f1"]), _percent(r["auroc"]),
                     *(_percent(r.get("sensitivity", {}).get(name)) for name in class_names), r["seeds"],
                     *([r["weights_source"]] if len(sources) > 1 else [])])
        classes.append("paper-point" if r["fraction"] == PAPER_FRACTION else "")
    ours = _table(["method", "ROI mode", "training subset", "accuracy % (mean ± std over seeds)", "95 % CI (bootstrap)",
                   *(text for name in external for text in (f"external {name}: accuracy %", f"external {name}: 95 % CI")),
                   "balanced acc. %", "macro-F1 %", "AUROC %", *(f"sensitivity {name} %" for name in class_names), "seeds",
                   *(["encoder weights"] if len(sources) > 1 else [])], rows, classes, table_class="full")

    paper = paper_results(dataset)
    if paper:
        counterparts = [r for r in metrics["results"] if r["fraction"] is not None and r["method"] in PAPER_COUNTERPARTS]
        fractions = sorted({f for by_fraction in paper.values() for f in by_fraction} | {r["fraction"] for r in counterparts})
        paper_rows = [[f"{label} (paper)", *(_percent(by_fraction.get(f)) for f in fractions)] for label, by_fraction in paper.items()]
        cells: dict[str, dict[float, str]] = {}
        for r in counterparts:
            cells.setdefault(f"{r['method']}/{r['mode']} (this run)", {})[r["fraction"]] = f"{r['accuracy']:.2f} ± {r['accuracy_std']:.2f}"
        paper_rows += [[label, *(by_fraction.get(f) for f in fractions)] for label, by_fraction in cells.items()]
        side = _table(["test accuracy %", *(subset_label(f, None) for f in fractions)], paper_rows)
        side += "<p>The paper's CLIP line (pretrained CLIP after the same few-shot training) is given at 5% only, approximately.</p>"
    else:
        covered = ", ".join(paper_datasets())
        side = f"<p>The paper (MedFocusCLIP, Arora &amp; Namboodiri) reports no numbers for <code>{_e(dataset)}</code>; it covers {_e(covered)}.</p>"
    weights = f" Encoder weights of every row: <code>{_e(sources[0])}</code>." if len(sources) == 1 else ""
    return (f'<details id="all-results"><summary>All results: every method × ROI mode × training subset, with balanced '
            f'accuracy, macro-F1, AUROC and sensitivity per class ({len(metrics["results"])} rows; also in '
            f'<code>metrics.json</code> and <code>evaluation/runs.csv</code>)</summary>'
            f'<p>Test accuracy on {_e(metrics["test_images"])} held-out images: mean ± std over seeds, and '
            f'the 95% bootstrap interval over the test images of the seed-mean accuracy; rows at 5% (the paper\'s protocol '
            f'point) are highlighted.{_e(_left_out_note(metrics))}{weights}</p>{ours}'
            f'<div class="paper"><h3>The paper\'s numbers</h3>{side}</div></details>')


def _row_order(row: dict) -> tuple:
    """The trainer's methods in their order, the whole image first, then the training subsets in order."""
    method_rank = METHODS.index(row["method"]) if row["method"] in METHODS else len(METHODS)
    mode_rank = STEERING_MODES.index(row["mode"]) if row["mode"] in STEERING_MODES else len(STEERING_MODES)
    return (method_rank, row["method"], mode_rank, row["mode"], row["fraction"] is None, row["fraction"] or 0.0, row["shots"] or 0)


# ---------------------------------------------------------------------------------------------------- the answer first
def headline_section(summary: dict) -> str:
    """Data, models and ROI quality, then the headline sentences (:func:`~medfocus.pipeline.results_summary.headline`)."""
    facts = "".join(f"<dt>{_e(what)}</dt><dd>{_e(text)}</dd>" for what, text in context_lines(summary))
    sentences = headline(summary)
    warning = f'<p class="warn">{_e(sentences.pop(0))}</p>' if sentences[0].startswith(RANDOM_INIT_HEADLINE) else ""
    items = "".join(f"<li>{_e(sentence)}</li>" for sentence in sentences)
    return f'<section class="headline" id="headline">{warning}<dl class="facts">{facts}</dl><ol class="findings">{items}</ol></section>'


def compact_section(summary: dict) -> str:
    """One row per method (ROI mode where it matters), one column per training subset, mean ± std, the best per column
    in bold; the paper's lines below; then the ROI's effect per subset."""
    table = summary["table"]
    columns = table["columns"]
    point = summary["protocol_point"]["column"]
    head = "<th>method</th>" + "".join(f'<th class="point">{_e(c)}</th>' if c == point else f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for row in table["rows"]:
        cells = []
        for column in columns:
            cell = row["cells"].get(column)
            ci = cell and cell.get("ci95")
            title = f' title="95 % CI {pct(ci[0])}–{pct(ci[1])}"' if ci else ""
            text = _e(cell_text(cell).removesuffix(" *"))
            cells.append(f'<td class="best"{title}><strong>{text}</strong></td>' if cell and cell["best"] else f"<td{title}>{text}</td>")
        css = ' class="roi"' if row["uses_roi"] else ""
        body.append(f"<tr{css}><th>{_e(row['label'])}</th>{''.join(cells)}</tr>")
    for row in summary["paper_rows"]:
        body.append(f'<tr class="paper-row"><th>{_e(row["label"])}</th>'
                    + "".join(f"<td>{_e(pct(row['cells'].get(c)))}</td>" for c in columns) + "</tr>")
    seeds = sorted({cell["seeds"] for row in table["rows"] for cell in row["cells"].values() if cell.get("seeds")})
    merged = (f" {_e(', '.join(table['merged']))} read the global embedding, which is the whole image's in modes none "
              "and dual alike: their identical rows are shown once." if table["merged"] else "")
    merged += "".join(f" Not run: {_e(method)} ({_e(reason)})." for method, reason in summary.get("not_run", {}).items())
    notes = (f"<p class=\"note\">Test accuracy %, mean ± std over {_e('/'.join(map(str, seeds)))} seed(s); "
             f"<strong>bold</strong>: the best in its column; hover a cell for its 95 % interval; shaded rows use the ROI."
             f"{merged} Every row, with balanced accuracy, macro-F1, AUROC and per-class sensitivity, is under "
             "<a href=\"#all-results\">All results</a>.</p>")
    return (f'<h2 id="results">Results at a glance</h2><table class="compact"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>{notes}{_roi_effect_table(summary)}")


def _roi_effect_table(summary: dict) -> str:
    effect = summary["roi_effect"]
    if effect["why"] or not effect["by_column"]:
        return f"<h3>The ROI's effect</h3><p>Not measured: {_e(effect['why'] or 'no subset has both kinds of row')}.</p>"
    rows = [[e["column"], e["roi"]["label"], pct(e["roi"]["accuracy"]), e["whole"]["label"], pct(e["whole"]["accuracy"]),
             signed(e["difference"]), "—" if e["ci95"] is None else f"{signed(e['ci95'][0])} to {signed(e['ci95'][1])}",
             {"helps": "the ROI helps", "hurts": "the ROI hurts", "unclear": "no clear difference"}[e["verdict"]]]
            for e in effect["by_column"]]
    return ("<h3>The ROI's effect</h3>" + _table(["training subset", "best row with the ROI", "accuracy %",
                                                  "best whole-image row", "accuracy %", "difference (points)", "95 % CI",
                                                  "verdict"], rows, table_class="effect")
            + f"<p class=\"note\">Interval: {_e(effect['interval'])}; “helps” or “hurts” when it excludes 0.</p>")


def per_class_section(summary: dict) -> str:
    """Sensitivity and specificity per class of the row fixed in advance, and its confusion matrix summed over seeds."""
    classes = summary.get("per_class")
    if not classes:
        return ""
    label = f"{classes['method']} ({'ROI: ' + classes['mode'] if classes['mode'] != 'none' else 'whole image'})"
    rows = [[c["name"], c["test_images"], f"{pct(c['sensitivity']['mean'])} ± {pct(c['sensitivity']['std'])}",
             f"{pct(c['specificity']['mean'])} ± {pct(c['specificity']['std'])}"] for c in classes["classes"]]
    names = classes["class_names"]
    matrix = _table(["true \\ predicted", *names], [[name, *counts] for name, counts in zip(names, classes["confusion_matrix_summed"])],
                    table_class="numbers")
    seeds = len(classes["seeds"])
    return (f'<h2 id="per-class">Per class: {_e(label)} at {_e(classes["column"])}</h2>'
            f"<p>The method shown here was fixed before any result: {_e(classes['chosen_by'])} — not the best row above. "
            f"Sensitivity (true-positive rate) and specificity (true-negative rate), one class against the others, mean ± std "
            f"over {seeds} seed(s).</p><div class=\"side-by-side\"><div>"
            + _table(["class", "test images", "sensitivity %", "specificity %"], rows, table_class="numbers")
            + f"</div><div><p class=\"note\">Confusion matrix, summed over the {seeds} seed(s) (every seed classifies the "
            f"same test images):</p>{matrix}</div></div>")


def _groups_table(name: str, item: dict, columns: list[str]) -> str:
    """One external set's accuracy within each group of its groups file: a row per compact-table row and group."""
    counts = item["groups"]["counts"]
    rows = []
    for row in item["rows"]:
        for group, per_class in counts.items():
            cells = []
            for column in columns:
                scores = (row["cells"].get(column) or {}).get("groups", {}).get(group)
                title = ""
                if scores:
                    low, high = scores["accuracy_ci95"]
                    recall = ", ".join(f"{cls} {pct(value)}" for cls, value in scores["recall"].items())
                    title = f' title="95 % CI {pct(low)}–{pct(high)}; recall: {_e(recall)}"'
                cells.append(f"<td{title}>{_e(pct(scores['accuracy']) if scores else '—')}</td>")
            css = ' class="roi"' if row["uses_roi"] else ""
            rows.append(f"<tr{css}><th>{_e(row['label'])}</th><th>{_e(group)} ({sum(per_class.values())})</th>{''.join(cells)}</tr>")
    makeup = "; ".join(f"{group}: " + ", ".join(f"{n} {c}" for c, n in per_class.items() if n) for group, per_class in counts.items())
    return (f'<table class="compact"><thead><tr><th>method</th><th>group (images)</th>'
            f'{"".join(f"<th>{_e(c)}</th>" for c in columns)}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f'<p class="note">Accuracy on {_e(name)} within each group of {_e(item["groups"]["file"])} (%, mean over seeds; '
            f"hover for the 95 % bootstrap interval over the group's images and the recall of each class). Groups: {_e(makeup)}.</p>")


def external_section(summary: dict, metrics: dict, plots: dict[str, dict[str, str]]) -> str:
    """Per external test set: internal | external accuracy of every row at every training subset (the same fits), what
    was removed as copies of the training source, the class map, and its plots (accuracy vs fraction, the confusion
    matrix of the run fixed in advance)."""
    external = summary.get("external")
    if not external:
        return ""
    columns = external["columns"]
    parts = ['<h2 id="external">External test sets: internal | external</h2>']
    for name, item in external["sets"].items():
        rows = []
        for row in item["rows"]:
            cells = []
            for column in columns:
                cell = row["cells"].get(column)
                ci = cell and cell.get("external_ci95")
                title = f' title="external 95 % CI {pct(ci[0])}–{pct(ci[1])}"' if ci else ""
                cells.append(f"<td{title}>{_e(external_cell_text(cell))}</td>")
            css = ' class="roi"' if row["uses_roi"] else ""
            rows.append(f"<tr{css}><th>{_e(row['label'])}</th>{''.join(cells)}</tr>")
        meta = metrics.get("external", {}).get(name, {})
        copies = meta.get("copies_of_training_source", {})
        mapping = "; ".join(f"{external_class} = {' + '.join(training)}" for external_class, training in (item["class_map"] or {}).items())
        unmapped = item.get("unmapped_training_classes") or []
        parts.append(
            f"<h3>{_e(name)}: {item['images']} images ({_e(meta.get('root', ''))})</h3>"
            f'<table class="compact"><thead><tr><th>method</th>{"".join(f"<th>{_e(c)}</th>" for c in columns)}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
            '<p class="note">' f"Each cell: internal test accuracy | accuracy on {_e(name)} (%, mean over seeds; the same fits, "
            f"never trained, validated or chosen on {_e(name)}); hover for the external 95 % bootstrap interval. Classes: "
            f"{_e(mapping)} (probabilities summed over the mapped classes)"
            + (f"; a prediction of {_e(', '.join(unmapped))}, which {_e(name)} lacks, counts as an error" if unmapped else "")
            + f". Removed from {_e(name)} as copies of {_e(summary['dataset']['name'])} images: {copies.get('byte_copies', 0)} "
            f"byte-identical and {copies.get('near_copies', 0)} near-copies (examples in metrics.json, external.json).</p>")
        if item.get("groups"):
            parts.append(_groups_table(name, item, columns))
        for kind, caption in (("accuracy", f"Accuracy on {name} against training fraction"),
                              ("confusion_matrix", f"Confusion matrix on {name}: the run fixed in advance")):
            if kind in plots.get(name, {}):
                parts.append(_figure(plots[name][kind], caption))
    return "".join(parts)


def _versions_table(columns: dict[str, dict]) -> str:
    names = sorted({name for versions in columns.values() for name in versions})
    rows = [[name, *(versions.get(name) for versions in columns.values())] for name in names]
    return _table(["package", *columns], rows)


def _provenance_section(info: dict) -> str:
    segment, features, prepare = info["segment"], info["features"], info["prepare"]
    encoder, segmenter = features.get("encoder", {}), segment.get("spec", {})
    model = segmenter.get("model", {})
    segmenter_source = RANDOM_INIT if segment.get("random_init") else f"pretrained: {model.get('name')}"
    # an encoder bank: one row per encoder, with its weights and its own stores
    members = [member["encoder"] for member in features.get("bank", [])] or [encoder]
    weights_rows = [
        *[["image encoder", member.get("model"), member.get("weights_source"), member.get("weights_sha256")] for member in members],
        ["segmenter", segmenter.get("backend"), segmenter_source, model.get("weights_sha256")],
    ]
    stores = [["masks", "—", segment.get("store_key"), segment.get("store")]]
    stores += [["features", mode, entry.get("store_key"), entry.get("store")] for mode, entry in features.get("modes", {}).items()]
    stores += [[f"features ({member['encoder'].get('model')})", mode, entry.get("store_key"), "—"]
               for member in features.get("bank", [])[1:] for mode, entry in member.get("modes", {}).items()]
    runs = [["segment", segment.get("total"), segment.get("processed"), segment.get("skipped"), segment.get("failed_count"),
             segment.get("seconds"), segment.get("scheduler")]]
    runs += [[f"features [{mode}]", m.get("total"), m.get("processed"), m.get("skipped"), m.get("failed_count"),
              m.get("seconds"), m.get("scheduler")] for mode, m in features.get("modes", {}).items()]
    head = info["head"]
    data_rows = [
        ["images (after de-duplication)", prepare.get("images")],
        ["train / test per class", json.dumps(prepare.get("counts"))],
        ["test split", prepare.get("test_split")],
        ["duplicate files removed", prepare.get("duplicate_files_removed")],
        ["unreadable files skipped", prepare.get("corrupt_count")],
        ["train/test leaks removed", prepare.get("leaked_train_test")],
        ["near-copy groups (perceptual hash + structure)", prepare.get("near_duplicate_groups")],
        ["near-copies removed from train", prepare.get("near_duplicate_files_removed")],
        ["near-copies of a test image (leaks)", prepare.get("near_duplicate_leaks")],
        ["near-copies with different labels", prepare.get("near_duplicate_label_conflicts")],
        ["warnings", "; ".join(prepare.get("warnings", [])) or None],
    ]
    return (
        "<h2>Provenance</h2>"
        "<h3>Weights</h3>" + _table(["model", "name", "weights source", "weights sha256"], weights_rows)
        + f"<p>ROI policy: <code>{_e(segment.get('policy'))}</code>. Segmenter: <code>{_e(json.dumps(segmenter, sort_keys=True))}</code></p>"
        + f"<p>Encoder ({_e(features.get('encoder_choice'))}): <code>{_e(json.dumps(encoder, sort_keys=True))}</code></p>"
        + "<h3>Trained head shown above</h3>" + _table(list(head), [list(head.values())])
        + "<h3>Data</h3>" + _table(["", ""], data_rows)
        + "<h3>Stores</h3>" + _table(["store", "ROI mode", "key", "location"], stores)
        + "<h3>Stage runs</h3>" + _table(["stage", "images", "processed", "skipped", "failed", "seconds", "scheduler"], runs)
        + "<h3>Versions</h3>" + _versions_table(info["versions"])
        + "<h3>Params</h3><pre>" + _e(yaml.safe_dump(info["params"], sort_keys=False)) + "</pre>"
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
.banner { background: #c00; color: #fff; font-size: 1.3em; padding: 1em; border: 4px solid #700; margin: 1em 0; }
.banner code { color: #fff; background: transparent; font-size: 1em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr.paper-point { background: #fff7d6; }
.side-by-side { display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
.paper { border-left: 3px solid #888; padding-left: 1em; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
pre, code { font-size: 0.8em; background: #f7f7f7; word-break: break-all; white-space: pre-wrap; }
.headline { border: 1px solid #bbb; border-left: 6px solid #2a6; padding: 0.6em 1.2em; margin: 1em 0; background: #f8fbf9; }
.headline .facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.2em 1em; margin: 0.3em 0; }
.headline dt { font-weight: bold; color: #555; }
.headline dd { margin: 0; }
.findings li { font-size: 1.1em; margin: 0.45em 0; line-height: 1.4; }
.headline .warn { color: #b00; font-weight: bold; font-size: 1.15em; }
table.compact th, table.compact td { text-align: right; white-space: nowrap; }
table.compact tbody th, table.compact thead th:first-child { text-align: left; }
table.compact tbody th { background: none; font-weight: normal; }
table.compact th.point { background: #fff0b3; }
table.compact td.best { background: #dff3e4; }
table.compact tr.roi { background: #f4f8ff; }
table.compact tr.paper-row { color: #555; font-style: italic; border-top: 2px solid #888; }
.note { font-size: 0.85em; color: #555; }
table.full td { white-space: nowrap; }
table.numbers td:not(:first-child), table.effect td:nth-child(3), table.effect td:nth-child(5),
table.effect td:nth-child(6), table.effect td:nth-child(7) { text-align: right; }
details { margin: 1em 0; }
details > summary { cursor: pointer; font-weight: bold; font-size: 1.1em; }
"""


def _near_duplicates_section(prepare: dict) -> str:
    if not prepare.get("near_duplicate_groups"):
        return ("<h2>Near-copies</h2><p>prepare found no near-copies (resized, re-encoded or brightened copies) "
                "among the images.</p>")
    return ("<h2>Near-copies</h2>"
            f"<p>prepare found {prepare['near_duplicate_groups']} group(s) of near-copies: "
            f"{prepare['near_duplicate_files_removed']} training image(s) removed, {prepare['near_duplicate_leaks']} of them "
            f"copies of a test image, and {prepare['near_duplicate_label_conflicts']} group(s) filed under different labels "
            "(dropped from training). Every pair is listed in prepare.json; a few are shown here, label conflicts first, "
            "then the weakest matches.</p>" + _figure(NEAR_DUPLICATE_GALLERY, "Near-copy pairs found by prepare"))


def render_page(dataset: str, info: dict) -> str:
    random_parts = info["random_init_parts"]
    weights = info["features"].get("weights_source")
    title = f"medfocus report: {dataset}" + (f" ({RANDOM_INIT})" if random_parts else "")
    summary = info["metrics"].get("summary")
    figures = [_figure(ACCURACY_PLOT, "Test accuracy against training fraction (mean ± std over seeds)"),
               _figure(CONFUSION_PLOT, "Confusion matrix of train.method/train.mode at the largest fraction, first seed (fixed in advance, not the best run)")]
    overlays = [_figure(o["file"], f"{o['image']}: true {o['true']}, predicted {o['predicted']} ({100 * o['probability']:.1f}%)")
                for o in info["overlays"]]
    return "".join([
        f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        _banner(random_parts),
        *(_answer_first(summary) + [external_section(summary, info["metrics"], info.get("external_plots", {}))] if summary else [
            f"<p>Encoder <code>{_e(info['features'].get('encoder', {}).get('model'))}</code>, weights <code>{_e(weights)}</code>; "
            f"segmenter <code>{_e(info['segment'].get('spec', {}).get('backend'))}</code> with ROI policy "
            f"<code>{_e(info['segment'].get('policy'))}</code>. This metrics.json has no summary: rerun "
            "<code>medfocus evaluate</code> for the headline.</p>"]),
        results_section(info["metrics"], dataset),
        "<h2>Plots</h2>", *figures,
        "<h2>Regions of interest</h2><p>Every mask the segmenter found, with the chosen ROI outlined.</p>",
        _figure(ROI_GALLERY, "ROI gallery"),
        "<h2>Where the trained head looks</h2><p>Test images as the encoder saw them: ROI share per patch and the "
        "attention of the predicted class.</p>",
        *(overlays or ["<p>No test image has features.</p>"]),
        _near_duplicates_section(info["prepare"]),
        _provenance_section(info),
        "</body></html>\n",
    ])


def _answer_first(summary: dict) -> list[str]:
    return [headline_section(summary), compact_section(summary), per_class_section(summary)]


# ---------------------------------------------------------------------------------------------------- stage
def headline_accuracy(metrics: dict) -> dict[str, dict[str, float]]:
    """{"method/mode": {"5%": accuracy, ...}}: the flat form `dvc metrics show` and `dvc metrics diff` print (a
    global-embedding method's dual row, the same numbers as its none row, left out as in the compact table)."""
    merged = set(metrics.get("summary", {}).get("table", {}).get("merged", []))
    table: dict[str, dict[str, float]] = {}
    for row in metrics["results"]:
        if row["method"] in merged and row["mode"] == "dual":
            continue
        table.setdefault(f"{row['method']}/{row['mode']}", {})[subset_label(row["fraction"], row["shots"])] = row["accuracy"]
    return table


def report(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> dict:
    """Write the report folder and ``report.json``; return the summary written there."""
    metrics = _read_stage_output(paths.metrics, spec.name, "evaluate")
    segment_summary = _read_stage_output(paths.segment_summary, spec.name, "segment")
    features_summary = _read_stage_output(paths.features_summary, spec.name, "features")
    prepared = load_prepared(spec, params, paths, progress=False)
    out_dir = paths.report_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)  # the folder is this stage's alone; pictures of an earlier run must not linger
    out_dir.mkdir(parents=True)

    for name in (ACCURACY_PLOT, CONFUSION_PLOT):
        source = paths.evaluation_dir / name
        if not source.exists():
            raise ReportInputMissingError(f"no {source}: run `medfocus evaluate --dataset {spec.name}` first")
        shutil.copyfile(source, out_dir / name)
    mask_store = current_mask_store(spec, params, paths)
    write_gallery(prepared, mask_store, out_dir / ROI_GALLERY, params.report.gallery_images,
                  f"{spec.name}: {segment_summary['spec']['backend']} masks, ROI policy {segment_summary['policy']}")
    if prepared.summary.get("near_duplicate_groups"):
        write_near_duplicate_gallery(prepared.summary["near_duplicates"]["pairs"], out_dir / NEAR_DUPLICATE_GALLERY,
                                     title=f"{spec.name}: near-copies found by prepare")
    external_plots = {}
    index = paths.external_evaluation_dir / "index.json"
    if index.exists():  # the external test sets' plots (evaluate writes them and names them in index.json)
        external_plots = read_json(index)["sets"]
        for files in external_plots.values():
            for file in files.values():
                shutil.copyfile(paths.external_evaluation_dir / file, out_dir / f"external_{file}")
        external_plots = {name: {kind: f"external_{file}" for kind, file in files.items()} for name, files in external_plots.items()}
    overlay_count = min(len(prepared.class_names), params.report.gallery_images)
    overlays, head = write_attention_overlays(spec, prepared, params, paths, out_dir, overlay_count)

    random_parts = random_init_parts(segment_summary, features_summary, metrics)
    info = {
        "metrics": metrics,
        "segment": segment_summary,
        "features": features_summary,
        "prepare": prepared.summary,
        "head": head,
        "overlays": overlays,
        "external_plots": external_plots,
        "random_init_parts": random_parts,
        "params": params.model_dump(by_alias=True, mode="json"),
        "versions": {"segment": segment_summary.get("versions", {}), "features": features_summary.get("versions", {}),
                     "evaluate": metrics.get("versions", {}), "report": package_versions()},
    }
    page = out_dir / REPORT_PAGE
    write_atomic(page, render_page(spec.name, info))
    summary = {
        "dataset": spec.name,
        "report": str(page),
        "weights_source": features_summary.get("weights_source"),
        "random_init": bool(random_parts),
        **({"warning": f"{RANDOM_INIT}: {' and '.join(random_parts)} without pretrained weights; not real results"} if random_parts else {}),
        "test_images": metrics["test_images"],
        **({"headline": flat_headline(metrics["summary"])} if "summary" in metrics else {}),
        "accuracy": headline_accuracy(metrics),
        "paper": metrics.get("paper"),
        "images": sorted(p.name for p in out_dir.glob("*.png")),
    }
    write_json(report_summary_path(paths), summary)
    return summary
