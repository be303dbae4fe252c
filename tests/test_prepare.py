"""The prepare stage: manifests, corrupt files, duplicates, leakage, empty classes, stratified nested subsets."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from typer.testing import CliRunner

from medfocus.pipeline.cli import app
from medfocus.pipeline.config import parse_params
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.manifest import DatasetError, read_manifest
from medfocus.pipeline.paths import DatasetPaths
from medfocus.stages.prepare import prepare

from .conftest import requires_shared, write_image


def _prepare(root, tmp_path, name="adhoc", **prepare_params):
    params = parse_params({"prepare": prepare_params} if prepare_params else {})
    paths = DatasetPaths(name, tmp_path / "cache")
    return prepare(resolve_dataset(name, root, params), params, paths, progress=False), paths


def test_folder_per_class_gets_a_stratified_test_split(folder_dataset, tmp_path):
    summary, paths = _prepare(folder_dataset, tmp_path, test_fraction=0.34)
    entries = read_manifest(paths.manifest)
    assert len(entries) == 18 and summary["images"] == 18
    per_split = Counter((e.split, e.label) for e in entries)
    for label in ("alpha", "beta", "gamma"):
        assert per_split[("test", label)] == 2 and per_split[("train", label)] == 4
    assert set(summary["counts"]["train"]) == {"alpha", "beta", "gamma"}
    assert summary["corrupt"] == [] and summary["duplicate_groups"] == 0 and summary["leaked_train_test"] == 0


def test_corrupt_and_non_image_files_are_listed_and_skipped(folder_dataset, tmp_path):
    (folder_dataset / "alpha" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder_dataset / "beta" / "notes.txt").write_text("not an image")
    summary, paths = _prepare(folder_dataset, tmp_path)
    corrupt = {c["path"].split("/")[-1] for c in summary["corrupt"]}
    assert corrupt == {"broken.png", "notes.txt"}
    assert summary["images"] == 18  # no other image lost
    assert all("reason" in c and c["reason"] for c in summary["corrupt"])


def test_duplicates_collapse_and_cross_split_copies_are_leakage(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for name in ("a", "b"):
            for i in range(4):
                write_image(root / split / name / f"{i}.png", seed=hash((split, name, i)) % 10_000)
    shutil.copy(root / "test" / "a" / "0.png", root / "train" / "a" / "leak.png")  # in both splits
    shutil.copy(root / "train" / "b" / "1.png", root / "train" / "b" / "copy.png")  # duplicate within train
    summary, paths = _prepare(root, tmp_path)
    assert summary["leaked_train_test"] == 1
    assert summary["leaks"][0]["removed_from_train"][0].endswith("train/a/leak.png")
    assert summary["duplicate_groups"] == 2 and summary["duplicate_files_removed"] == 2
    entries = read_manifest(paths.manifest)
    hashes = [e.hash for e in entries]
    assert len(hashes) == len(set(hashes)) == 16
    assert summary["test_split"] == "from dataset"


def test_same_bytes_with_two_labels_are_dropped_and_reported(folder_dataset, tmp_path):
    shutil.copy(folder_dataset / "alpha" / "alpha_0.png", folder_dataset / "beta" / "confusing.png")
    summary, paths = _prepare(folder_dataset, tmp_path)
    assert len(summary["conflicting_labels"]) == 1
    assert summary["images"] == 17


def test_empty_class_folder_is_a_clear_error(folder_dataset, tmp_path):
    (folder_dataset / "delta").mkdir()
    with pytest.raises(DatasetError, match="delta.*empty"):
        _prepare(folder_dataset, tmp_path)


def test_single_image_class_warns_instead_of_crashing(folder_dataset, tmp_path):
    write_image(folder_dataset / "delta" / "only.png", seed=999)
    summary, _ = _prepare(folder_dataset, tmp_path)
    assert summary["counts"]["train"]["delta"] == 1 and "delta" not in summary["counts"]["test"]
    assert any("delta" in w for w in summary["warnings"])


def test_subsets_are_stratified_nested_and_reproducible(tmp_path):
    root = tmp_path / "data"
    for ci, name in enumerate(["x", "y"]):
        for i in range(30 if name == "x" else 10):
            write_image(root / name / f"{i}.png", seed=ci * 1000 + i, size=16)
    summary, paths = _prepare(root, tmp_path, test_fraction=0.2)
    subsets = json.loads(paths.splits.read_text())
    labels = {e.hash: e.label for e in read_manifest(paths.manifest)}
    train_hashes = {e.hash for e in read_manifest(paths.manifest) if e.split == "train"}
    for seed in map(str, range(5)):
        previous: set[str] = set()
        for fraction in ("0.05", "0.1", "0.2", "0.5", "1"):
            chosen = set(subsets["fraction"][fraction][seed])
            assert previous <= chosen <= train_hashes  # nested, train only
            assert {labels[h] for h in chosen} == {"x", "y"}  # at least one per class
            previous = chosen
        assert previous == train_hashes
        shots = [set(subsets["shots"][k][seed]) for k in ("1", "2", "4", "8", "16")]
        assert all(a <= b for a, b in zip(shots, shots[1:]))
        assert Counter(labels[h] for h in shots[2]) == {"x": 4, "y": 4}
    half = Counter(labels[h] for h in subsets["fraction"]["0.5"]["0"])
    assert half == {"x": 12, "y": 4}  # 50% of 24 and of 8: stratified
    assert subsets["fraction"]["0.2"]["0"] != subsets["fraction"]["0.2"]["1"]
    again, paths_again = _prepare(root, tmp_path / "again", test_fraction=0.2)
    assert json.loads(paths_again.splits.read_text()) == subsets
    assert paths_again.manifest.read_text() == paths.manifest.read_text()


def test_csv_layout(tmp_path):
    root = tmp_path / "csvdata"
    lines = ["path,label,split"]
    for i in range(6):
        write_image(root / "imgs" / f"{i}.png", seed=i)
        lines.append(f"imgs/{i}.png,{'cat' if i % 2 else 'dog'},{'test' if i < 2 else 'train'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    summary, paths = _prepare(root / "labels.csv", tmp_path)
    assert summary["layout"] == "csv"
    assert summary["counts"] == {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}}


def test_cli_refuses_bad_test_fraction(folder_dataset, tmp_path):
    result = CliRunner().invoke(app, ["prepare", "--dataset", "adhoc", "--root", str(folder_dataset),
                                      "--cache-dir", str(tmp_path / "cache"), "--test-fraction", "1.5", "-q"])
    assert result.exit_code == 2
    assert "prepare.test_fraction" in result.output and "1.5" in result.output


def test_cli_unknown_dataset_without_root(tmp_path):
    result = CliRunner().invoke(app, ["prepare", "--dataset", "nosuch", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--root" in result.output


def test_real_covid_duplicates_leakage_and_a_corrupt_file(tmp_path):
    covid = requires_shared("covid")
    root = tmp_path / "covid"
    shutil.copytree(covid, root)  # a scratch copy: the shared data stays read-only
    (root / "train" / "Normal" / "zz_corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = CliRunner().invoke(app, ["prepare", "--dataset", "covid", "--root", str(root),
                                      "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cache" / "covid" / "prepare.json").read_text())
    assert summary["leaked_train_test"] == 6
    assert summary["duplicate_groups"] == 10
    assert [c["path"].split("/")[-1] for c in summary["corrupt"]] == ["zz_corrupt.jpeg"]
    assert "zz_corrupt.jpeg" in result.output
    assert set(summary["counts"]["train"]) == {"covid", "normal", "viral_pneumonia"}
