"""External test sets (issue 28): a test-only set from another source, scored by every fit beside the internal split.

Small generated data: a training dataset of demo scans (three classes) and external sets with coarser or partial
classes. The class-map arithmetic is checked by hand; the end-to-end test runs prepare, segment (real LiteMedSAM,
whole-image ROI), features (a random-init ViT-B-32: the numbers check the pipeline, not accuracy), evaluate and report.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medfocus.pipeline.config import parse_params
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.external import (
    ExternalSet,
    ExternalSetError,
    map_probabilities,
    mapping_matrix,
    read_groups,
    resolve_class_map,
)
from medfocus.pipeline.demo import render_demo_sample
from medfocus.pipeline.manifest import Entry
from medfocus.pipeline.paths import DatasetPaths
from medfocus.stages.evaluate import aggregate_external, score_external

from .test_segment_stage import medfocus, stage_json

TUMOURS = ["glioma_tumor", "meningioma_tumor", "pituitary_tumor"]
TRAINING = ["glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"]


# ---------------------------------------------------------------------------------------------------- class maps
def test_a_coarser_class_sums_the_probabilities_of_its_mapped_classes():
    class_map = resolve_class_map("br35h", ["no_tumor", "tumor"], TRAINING, {"tumor": TUMOURS})
    assert class_map == {"no_tumor": ["no_tumor"], "tumor": TUMOURS}  # no_tumor matched by name
    matrix = mapping_matrix(class_map, ["no_tumor", "tumor"], TRAINING)
    # glioma 0.2, meningioma 0.3, no_tumor 0.4, pituitary 0.1: tumour = 0.2 + 0.3 + 0.1 = 0.6 beats no tumour's 0.4,
    # although no_tumor is the single most likely training class.
    proba = np.array([[0.2, 0.3, 0.4, 0.1], [0.05, 0.05, 0.85, 0.05]])
    assert np.allclose(map_probabilities(proba, matrix), [[0.4, 0.6], [0.85, 0.15]])
    scores = score_external(proba, [1, 1], matrix, ["no_tumor", "tumor"])  # both are tumours
    assert scores["correct"] == [1, 0] and scores["accuracy"] == 0.5
    assert scores["confusion_matrix"] == [[0, 0], [1, 1]]


def test_a_prediction_of_a_class_the_external_set_lacks_is_an_error_in_its_confusion_matrix():
    training = ["alpha", "beta", "gamma"]
    class_map = resolve_class_map("partial", ["Alpha", "beta"], training, {})  # matched by name, case ignored
    columns = ["Alpha", "beta", "gamma"]  # gamma: no external class maps it, so it keeps a column of its own
    matrix = mapping_matrix(class_map, ["Alpha", "beta"], training)
    proba = np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.3, 0.6, 0.1]])
    scores = score_external(proba, [0, 0, 1], matrix, columns)
    assert scores["correct"] == [0, 1, 1] and scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["confusion_matrix"][0] == [1, 0, 1]  # the Alpha image predicted gamma counts, in gamma's column
    low, high = scores["accuracy_ci95"]
    assert 0.0 <= low <= 2 / 3 <= high <= 1.0


@pytest.mark.parametrize("external, class_map, message", [
    (["tumor", "no_tumor"], {"tumor": ["glioma_tumor", "astrocytoma"]}, "'astrocytoma'"),
    (["tumor", "no_tumor"], {}, "class folder 'tumor' matches no training class"),
    (["tumor", "no_tumor"], {"tumour": TUMOURS}, "'tumour'"),
    (["tumor", "no_tumor"], {"tumor": TUMOURS, "no_tumor": ["no_tumor", "glioma_tumor"]}, "mapped by both"),
])
def test_a_bad_class_map_names_what_is_wrong(external, class_map, message):
    with pytest.raises(ExternalSetError, match=message):
        resolve_class_map("br35h", external, TRAINING, class_map)


# ---------------------------------------------------------------------------------------------------- groups
def _set_of(paths: list[str]) -> ExternalSet:
    entries = [Entry(f"hash{i}", path, path.split("/")[0], "external", 64, 64, "L") for i, path in enumerate(paths)]
    return ExternalSet("br35h", Path("/data/br35h"), ["no_tumor", "tumor"], {"tumor": TUMOURS}, entries)


def test_groups_come_from_the_csv_by_path_and_unlisted_images_form_their_own_group(tmp_path):
    groups_file = tmp_path / "weighting.csv"
    # Written on Windows: a byte-order mark, CRLF line ends, backslashes; an absolute path under the set's root.
    groups_file.write_bytes("\ufeffpath , group,reader\r\ntumor\\y1.jpg,T2,a\r\n./no_tumor/3.jpg,T1,b\r\n"
                            "/data/br35h/tumor/y3.jpg,T1,a\r\ntumor/gone.jpg,T1,a\r\n".encode("utf-8"))
    external = _set_of(["no_tumor/3.jpg", "tumor/y1.jpg", "tumor/y2.jpg", "tumor/y3.jpg"])
    groups = read_groups(external, str(groups_file))
    assert groups.of_image == ["T1", "T2", "unlisted", "T1"]
    assert groups.rows_naming_no_image == 1  # tumor/gone.jpg: e.g. a copy of a training image, removed from the set


@pytest.mark.parametrize("text, message", [
    ("path,weighting\ntumor/y1.jpg,T2\n", "lacks column\\(s\\) group"),
    ("path,group\ntumor/y1.jpg,T2\ntumor/y1.jpg,T1\n", "two groups \\('T2' and 'T1'\\)"),
    ("path,group\ntumor/y1.jpg,T1\n\ntumor/y2.jpg,\n", "line 4: a row needs both a path and a group"),
    ("group,path\nT1\n", "line 2: a row needs both a path and a group"),
    ("path,group\ntumor/y1.jpg,unlisted\n", "the group name 'unlisted' is kept"),
    ("path,group\nimages/tumor/y1.jpg,T1\n", "names no image of the set .*e.g. tumor/y1.jpg; the file has e.g. images/tumor/y1.jpg"),
])
def test_a_bad_groups_file_names_what_is_wrong(tmp_path, text, message):
    groups_file = tmp_path / "groups.csv"
    groups_file.write_text(text)
    with pytest.raises(ExternalSetError, match=message):
        read_groups(_set_of(["tumor/y1.jpg"]), str(groups_file))
    with pytest.raises(ExternalSetError, match="groups file .*missing.csv not found"):
        read_groups(_set_of(["tumor/y1.jpg"]), str(tmp_path / "missing.csv"))


def test_accuracy_per_group_is_the_seeds_mean_within_each_group():
    # Two seeds on four external images in groups a, a, b, b: seed 0 gets 1 0 | 1 1, seed 1 gets 1 1 | 0 0.
    runs = [{"method": "m", "mode": "none", "fraction": 1.0, "shots": None, "seed": seed,
             "external": {"x": {"accuracy": float(np.mean(correct)), "correct": correct, "balanced_accuracy": 0.5,
                                "macro_f1": 0.5, "n_samples": 4}}}
            for seed, correct in ((0, [1, 0, 1, 1]), (1, [1, 1, 0, 0]))]
    # Classes: the images are tumour, none, tumour, tumour.
    groups = {"x": {"groups": ["a", "a", "b", "b"], "labels": [1, 0, 1, 1], "columns": ["no_tumor", "tumor"]}}
    cell = aggregate_external(runs, groups)[("m", "none", 1.0, None)]["x"]
    assert cell["accuracy"] == 62.5
    assert cell["groups"]["a"]["accuracy"] == 75.0 and cell["groups"]["a"]["accuracy_std"] == pytest.approx(35.36, abs=0.01)
    assert cell["groups"]["a"]["recall"] == {"no_tumor": 50.0, "tumor": 100.0}
    assert cell["groups"]["b"]["accuracy"] == 50.0 and cell["groups"]["b"]["images"] == 2
    assert cell["groups"]["b"]["recall"] == {"tumor": 50.0}  # b holds no image of no_tumor
    low, high = cell["groups"]["b"]["accuracy_ci95"]
    assert 0 <= low <= 50.0 <= high <= 100
    assert "groups" not in aggregate_external(runs)[("m", "none", 1.0, None)]["x"]


# ---------------------------------------------------------------------------------------------------- data
CLASSES = ["cyst", "nodule", "spiculated_mass"]
PARAMS = {
    "prepare": {"fractions": [0.5, 1.0], "shots": [], "subset_seeds": [0, 1], "test_fraction": 0.3},
    "segment": {"policy": "whole-image", "scheduler": "synchronous", "workers": 1},
    "features": {"model": "ViT-B-32", "pretrained": "none", "allow_random_init": True, "modes": ["none"],
                 "scheduler": "synchronous", "workers": 1},
    "train": {"method": "linear_probe", "mode": "none", "epochs": 3, "fraction": 1.0},
    "evaluate": {"methods": ["zero_shot", "linear_probe"], "modes": ["none"], "fractions": [0.5, 1.0], "seeds": [0, 1],
                 "scheduler": "synchronous"},
    "report": {"gallery_images": 2},
}
LESION = {"lesion": ["cyst", "nodule"]}  # a coarser external class: cyst or nodule


def _scan(class_index: int, index: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(render_demo_sample(class_index, index, size=128, seed=seed).image)


def make_data(base: Path) -> dict:
    """A training dataset (3 classes × 4 scans) and an external set (classes lesion = cyst + nodule, and
    spiculated_mass by name; 2 new scans each) holding also a byte copy and a resized near-copy of training images."""
    train, external = base / "train_data", base / "external_data"
    for class_index, name in enumerate(CLASSES):
        (train / name).mkdir(parents=True, exist_ok=True)
        for index in range(4):
            _scan(class_index, index).save(train / name / f"{name}_{index}.png")
    for class_index, name in ((0, "lesion"), (1, "lesion"), (2, "spiculated_mass")):
        folder = external / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(2 if name == "spiculated_mass" else 1):
            _scan(class_index, 10 + index, seed=7).save(folder / f"new_{class_index}_{index}.png")
    shutil.copyfile(train / "cyst" / "cyst_0.png", external / "lesion" / "byte_copy.png")
    Image.open(train / "nodule" / "nodule_1.png").resize((112, 112)).save(external / "lesion" / "resized_copy.jpg", quality=92)
    return {"train": train, "external": external}


def write_params(folder: Path, external_root: Path | None, class_map: dict | None = None) -> Path:
    params = json.loads(json.dumps(PARAMS))
    if external_root is not None:
        params["evaluate"]["external"] = {"other": {"root": str(external_root), "dataset": "tiny",
                                                    **({"class_map": class_map} if class_map is not None else {})}}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


# ---------------------------------------------------------------------------------------------------- prepare
def test_copies_of_training_images_are_removed_from_the_external_set_and_counted(tmp_path):
    data = make_data(tmp_path)
    params = write_params(tmp_path, data["external"], LESION)
    common = ("-d", "tiny", "--root", data["train"], "--params", params, "--cache-dir", tmp_path / "cache", "-q")
    assert medfocus("prepare", *common).exit_code == 0
    printed = stage_json(medfocus("external", *common))
    assert printed["other"]["removed_copies_of_training_source"] == {"byte_copies": 1, "near_copies": 1}
    assert printed["other"]["counts"] == {"lesion": 2, "spiculated_mass": 2}
    summary = json.loads((tmp_path / "cache" / "tiny" / "external.json").read_text())["sets"]["other"]
    copies = summary["copies_of_training_source"]
    assert copies["removed_from"] == "external set" and copies["removed"] == 2
    assert copies["byte_copy_examples"][0]["external"].endswith("byte_copy.png")
    assert copies["byte_copy_examples"][0]["training"].endswith("cyst_0.png")
    assert copies["near_copy_examples"][0]["external"].endswith("resized_copy.jpg")
    assert copies["near_copy_examples"][0]["training"].endswith("nodule_1.png")
    with (tmp_path / "cache" / "tiny" / "external" / "other" / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {row["split"] for row in rows} == {"external"}
    assert not any("copy" in row["path"] for row in rows)
    assert summary["class_map"] == {"lesion": ["cyst", "nodule"], "spiculated_mass": ["spiculated_mass"]}


def test_a_bad_class_map_is_a_one_line_error(tmp_path):
    data = make_data(tmp_path)
    params = write_params(tmp_path, data["external"], {"lesion": ["cyst", "polyp"]})
    common = ("-d", "tiny", "--root", data["train"], "--params", params, "--cache-dir", tmp_path / "cache", "-q")
    result = medfocus("external", *common)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "'polyp'" in lines[0] and "not training classes" in lines[0]
    # Without the class map, the coarser folder matches nothing: also one line, naming it.
    params = write_params(tmp_path, data["external"])
    result = medfocus("external", *common[:5], params, *common[6:])
    assert result.exit_code == 2 and "class folder 'lesion' matches no training class" in result.output
    assert medfocus("evaluate", *common[:5], params, *common[6:], "--external", "nonsense").exit_code == 2


def test_a_missing_groups_file_stops_resolve_with_one_line(tmp_path):
    data = make_data(tmp_path)
    params = write_params(tmp_path, data["external"], LESION)
    raw = yaml.safe_load(params.read_text())
    raw["evaluate"]["external"]["other"]["groups"] = str(tmp_path / "sites.csv")  # not there
    params.write_text(yaml.safe_dump(raw))
    common = ("-d", "tiny", "--root", data["train"], "--params", params, "--cache-dir", tmp_path / "cache")
    assert medfocus("prepare", *common, "-q").exit_code == 0
    result = medfocus("resolve", *common)  # evaluate reads the file with the same check (read_groups, above)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "groups file" in lines[0] and "sites.csv not found" in lines[0]
    assert not (tmp_path / "cache" / "tiny" / "external_groups.json").exists()


def test_an_external_set_changes_no_manifest_split_or_store_key_of_the_training_dataset(tmp_path):
    data = make_data(tmp_path)
    outputs = {}
    for case, external in (("without", None), ("with", data["external"])):
        folder = tmp_path / case
        folder.mkdir()
        params = write_params(folder, external, LESION)
        common = ("-d", "tiny", "--root", data["train"], "--params", params, "--cache-dir", folder / "cache")
        assert medfocus("prepare", *common, "-q").exit_code == 0
        resolved = stage_json(medfocus("resolve", *common))
        paths = DatasetPaths("tiny", folder / "cache")
        outputs[case] = {"keys": (resolved["segment"], resolved["features"]),
                         "files": [p.read_bytes() for p in (paths.manifest, paths.splits)],
                         "prepare": {k: v for k, v in json.loads(paths.prepare_summary.read_text()).items() if k != "root"},
                         "external": resolved["external"]}
    assert outputs["with"]["keys"] == outputs["without"]["keys"]
    assert outputs["with"]["files"] == outputs["without"]["files"]
    assert outputs["with"]["prepare"] == outputs["without"]["prepare"]
    assert outputs["without"]["external"] == {} and outputs["with"]["external"] == {"other": 4}


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from medfocus.stages.evaluate import evaluate
    from medfocus.stages.features import features
    from medfocus.stages.prepare import prepare
    from medfocus.stages.segment import segment
    from medfocus.stages.train import train

    base = tmp_path_factory.mktemp("external")
    data = make_data(base)
    raw = yaml.safe_load(write_params(base, data["external"], LESION).read_text())
    # Groups (e.g. scanners): site_a and site_b; the fourth external image is not listed (group "unlisted").
    groups_file = base / "sites.csv"
    groups_file.write_text("path,group\nlesion/new_0_0.png,site_a\nspiculated_mass/new_2_0.png,site_a\n"
                           "lesion/new_1_0.png,site_b\n")
    raw["evaluate"]["external"]["other"]["groups"] = str(groups_file)
    params = parse_params(raw)
    spec = resolve_dataset("tiny", data["train"], params)
    paths = DatasetPaths("tiny", base / "cache")
    prepare(spec, params, paths, progress=False)
    segmented = segment(spec, params, paths, progress=False)
    encoded = features(spec, params, paths, progress=False)
    train(spec, params, paths)  # the report's attention overlays need the head of train.method
    metrics = evaluate(spec, params, paths, progress=False)
    return {"spec": spec, "params": params, "paths": paths, "segment": segmented, "features": encoded, "metrics": metrics}


def test_segment_and_features_process_the_external_images_into_the_training_stores(evaluated):
    paths = evaluated["paths"]
    segment = json.loads(paths.segment_summary.read_text())
    assert segment["total"] == 12 and segment["done"] == 12  # the training dataset's counts, as without the set
    assert segment["external"]["other"]["images"] == 4 and segment["external"]["other"]["done"] == 4
    assert evaluated["segment"]["processed"] == 16
    features = json.loads(paths.features_summary.read_text())
    assert features["modes"]["none"]["done"] == 12 and features["modes"]["none"]["external"]["other"]["done"] == 4


def test_metrics_and_runs_carry_external_accuracy_with_an_interval(evaluated):
    metrics, paths = evaluated["metrics"], evaluated["paths"]
    assert json.loads(paths.metrics.read_text())["external"] == metrics["external"]
    external = metrics["external"]["other"]
    assert external["images"] == 4 and external["copies_of_training_source"]["removed"] == 2
    assert external["columns"] == ["lesion", "spiculated_mass"]
    matrix = external["confusion_matrix"]
    assert matrix["true_classes"] == ["lesion", "spiculated_mass"] and sum(map(sum, matrix["counts"])) == 4
    for row in metrics["results"]:
        cell = row["external"]["other"]
        low, high = cell["accuracy_ci95"]
        assert 0 <= low <= cell["accuracy"] <= high <= 100 and cell["images"] == 4 and cell["seeds"] == 2
    with paths.runs_csv.open() as handle:
        runs = list(csv.DictReader(handle))
    assert len(runs) == 2 * 2 * 2  # methods × fractions × seeds
    for run in runs:
        accuracy = float(run["external[other].accuracy"])
        low, high = json.loads(run["external[other].accuracy_ci95"])
        assert 0 <= low <= accuracy <= high <= 1 and run["external[other].n_samples"] == "4"
    # The external accuracy is the mean over the runs of each row.
    row = next(r for r in metrics["results"] if (r["method"], r["fraction"]) == ("linear_probe", 1.0))
    mine = [float(r["external[other].accuracy"]) for r in runs if (r["method"], r["fraction"]) == ("linear_probe", "1.0")]
    assert row["external"]["other"]["accuracy"] == pytest.approx(100 * np.mean(mine), abs=0.01)
    # Per group: images and classes counted; each row's accuracy within a group, its seeds' mean; the groups together
    # make up the whole set's accuracy.
    assert external["groups"]["counts"] == {"site_a": {"lesion": 1, "spiculated_mass": 1},
                                            "site_b": {"lesion": 1, "spiculated_mass": 0},
                                            "unlisted": {"lesion": 0, "spiculated_mass": 1}}
    groups = row["external"]["other"]["groups"]
    assert {group: value["images"] for group, value in groups.items()} == {"site_a": 2, "site_b": 1, "unlisted": 1}
    assert sum(value["accuracy"] * value["images"] for value in groups.values()) / 4 == pytest.approx(
        row["external"]["other"]["accuracy"], abs=0.02)
    # runs.csv: each run's accuracy within each group; the row's group accuracy is their mean.
    site_a = [float(r["external[other].group[site_a].accuracy"]) for r in runs if (r["method"], r["fraction"]) == ("linear_probe", "1.0")]
    assert groups["site_a"]["accuracy"] == pytest.approx(100 * np.mean(site_a), abs=0.01)
    plotted = (paths.evaluation_dir / "accuracy_vs_fraction.csv").read_text()
    assert "linear_probe/none @ external other" in plotted
    index = json.loads((paths.external_evaluation_dir / "index.json").read_text())
    for file in index["sets"]["other"].values():
        assert (paths.external_evaluation_dir / file).stat().st_size > 1000


def test_the_summary_and_the_report_show_internal_beside_external(evaluated):
    from medfocus.pipeline.results_summary import flat_headline, headline, render_text
    from medfocus.stages.report import report

    summary = evaluated["metrics"]["summary"]
    table = summary["external"]["sets"]["other"]
    assert summary["external"]["columns"] == ["50%", "100%"]
    assert [row["label"] for row in table["rows"]] == [row["label"] for row in summary["table"]["rows"]]
    cell = table["rows"][0]["cells"]["100%"]
    assert cell["difference"] == pytest.approx(cell["external"] - cell["internal"], abs=0.01)
    sentence = next(s for s in headline(summary) if s.startswith("Transfer to an external test set"))
    assert "% on other (95 % CI" in sentence and "4 images from another source, after removing 1 byte and 1 near-copies" in sentence
    best = next(row for row in table["rows"] if row["label"] == summary["best"]["label"])["cells"]["50%"]
    assert f"reaches {best['external']:.1f} ± {best['external_std']:.1f} % on other" in sentence
    assert "external" in flat_headline(summary) and "other" in flat_headline(summary)["external"]
    text = render_text(summary)
    assert "internal | external test accuracy % on other" in text
    assert f"{cell['internal']:.1f} | {cell['external']:.1f}" in text

    written = report(evaluated["spec"], evaluated["params"], evaluated["paths"])
    page = Path(written["report"]).read_text()
    assert "External test sets: internal | external" in page and "lesion = cyst + nodule" in page
    assert "1 byte-identical and 1 near-copies" in page
    assert "external_other_accuracy_vs_fraction.png" in page and "external_other_confusion_matrix.png" in page
    assert (evaluated["paths"].report_dir / "external_other_confusion_matrix.png").is_file()
    # The full table (All results): every row's external accuracy and interval beside its internal ones.
    assert "<th>external other: accuracy %</th><th>external other: 95 % CI</th>" in page
    row = evaluated["metrics"]["results"][0]["external"]["other"]
    low, high = row["accuracy_ci95"]
    assert f"<td>{row['accuracy']:.2f} ± {row['accuracy_std']:.2f}</td><td>{low:.1f}–{high:.1f}</td>" in page
    # The groups table: a row per method and group, the accuracy within the group per training subset.
    assert "<th>group (images)</th>" in page and "<th>site_a (2)</th>" in page and "<th>unlisted (1)</th>" in page
    site_b = table["rows"][0]["cells"]["100%"]["groups"]["site_b"]
    assert "<th>site_b (1)</th><td" in page and f">{site_b['accuracy']:.1f}</td>" in page
    assert f"recall: lesion {site_b['recall']['lesion']:.1f}" in page  # site_b holds one lesion image, no other class


# ---------------------------------------------------------------------------------------------------- dvc
@pytest.mark.slow
def test_dvc_tracks_an_external_set_like_any_other_input(tmp_path_factory):
    """Under `dvc repro`: an external set is segmented, encoded and scored; an image added to it is processed alone
    (prepare of the training dataset does not rerun); a repro with nothing changed runs only resolve, which changes nothing."""
    from .test_dvc_pipeline import ALL_STAGES, BIN, DATASET, RESOLVE, Clone

    if not (BIN / "dvc").exists() or shutil.which("git") is None:
        pytest.skip("dvc and git must be installed")
    repository = Clone.of_working_tree(tmp_path_factory.mktemp("clone"), tmp_path_factory.mktemp("python"))
    external = repository.root / "external_demo"
    for class_index, name in enumerate(CLASSES[:2]):
        (external / name).mkdir(parents=True)
        _scan(class_index, 50, seed=3).save(external / name / f"{name}_50.png")
    params = repository.params()
    params["evaluate"]["external"] = {"other": {"root": "external_demo", "dataset": DATASET}}
    repository.write_params(params)
    assert repository.repro() == ALL_STAGES
    assert repository.summary("segment")["external"]["other"]["done"] == 2
    metrics = json.loads((repository.root / "cache" / DATASET / "metrics.json").read_text())
    assert metrics["external"]["other"]["images"] == 2
    assert metrics["external"]["other"]["unmapped_training_classes"] == ["spiculated_mass"]
    assert "external" in repository.summary("report")["headline"]
    assert repository.repro() == {RESOLVE}

    # A groups file: only evaluate and report read it, so editing it reruns them (and the always-run resolve) alone.
    groups_file = repository.root / "external_sites.csv"
    groups_file.write_text("path,group\ncyst/cyst_50.png,site_a\nnodule/nodule_50.png,site_b\n")
    params["evaluate"]["external"]["other"]["groups"] = "external_sites.csv"
    repository.write_params(params)
    assert repository.repro() == {RESOLVE, f"evaluate@{DATASET}", f"report@{DATASET}"}
    groups_file.write_text("path,group\ncyst/cyst_50.png,site_a\nnodule/nodule_50.png,site_a\n")
    assert repository.repro() == {RESOLVE, f"evaluate@{DATASET}", f"report@{DATASET}"}
    metrics = json.loads((repository.root / "cache" / DATASET / "metrics.json").read_text())
    assert metrics["external"]["other"]["groups"]["counts"] == {"site_a": {"cyst": 1, "nodule": 1}}
    assert repository.repro() == {RESOLVE}

    _scan(1, 51, seed=3).save(external / "nodule" / "nodule_51.png")
    # train reruns too (features.json, its dependency, records the external images done); its head is the same.
    assert repository.repro() == ALL_STAGES - {"demo_data", f"prepare@{DATASET}"}
    assert {k: repository.summary("segment.run")[k] for k in ("processed", "skipped")} == {"processed": 1, "skipped": 6 + 2}
    assert repository.summary("segment")["external"]["other"]["done"] == 3
    assert repository.repro() == {RESOLVE}
