"""The prepare stage: manifests, corrupt files, duplicates, near-copies, leakage, empty classes, stratified nested subsets."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medfocus.stages.cli import app
from medfocus.pipeline.config import ConfigError, parse_params
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.images import image_signature
from medfocus.pipeline.manifest import DatasetError, read_manifest, stratified_test_split
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.gallery import write_near_duplicate_gallery
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
        assert per_split[("test", label)] >= 1 and per_split[("train", label)] >= 1
    # Each image's split is decided by its own hash draw (the rule: stratified_test_split), not by a count per class.
    expected, _ = stratified_test_split({e.hash: e.label for e in entries}, 0.34, seed=0)
    assert {e.hash: e.split for e in entries} == expected
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
    train_per_class = Counter(labels[h] for h in train_hashes)
    assert half == {label: round(0.5 * n) for label, n in train_per_class.items()}  # 50 % of each class: stratified
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


# ---------------------------------------------------------------------------------------------------- near-copies
def _scan(seed: int, lesion: tuple[float, float] | None = None, size: int = 128) -> np.ndarray:
    """A textured ultrasound-like image: every seed shares the organ outline, texture and lesion depend on the seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    organ = ((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.36) ** 2 < 1.0

    def smooth_noise(cells: int) -> np.ndarray:
        coarse = Image.fromarray(rng.normal(size=(cells, cells)).astype(np.float32), mode="F")
        return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))

    image = 40 + organ * (110 + 35 * (0.6 * smooth_noise(6) + 0.4 * smooth_noise(16))) + rng.normal(0, 6, (size, size))
    cy, cx = lesion if lesion is not None else rng.uniform(0.3, 0.7, 2)
    image[(x - cx) ** 2 + (y - cy) ** 2 < 0.006] = 30
    return np.repeat(np.clip(image, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _save(array: np.ndarray, path: Path, quality: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **({"quality": quality} if quality else {}))
    return path


def _resized(array: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((side, side), Image.Resampling.BILINEAR))


def _brighter(array: np.ndarray, factor: float = 1.05) -> np.ndarray:
    return np.clip(np.round(array * factor), 0, 255).astype(np.uint8)


def _jpeg(array: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _names(paths) -> set[str]:
    return {Path(p).name for p in paths}


def test_signature_ignores_resizing_reencoding_and_brightness_but_not_other_scans():
    original = image_signature(_scan(1))
    for copy in (_resized(_scan(1), 77), _jpeg(_scan(1), 60), _brighter(_scan(1))):
        signature = image_signature(copy)
        assert bin(original.phash ^ signature.phash).count("1") <= 2
        assert float(original.structure @ signature.structure) > 0.98
    for other in range(2, 8):
        signature = image_signature(_scan(other))
        assert bin(original.phash ^ signature.phash).count("1") > 8 or float(original.structure @ signature.structure) < 0.9
    flat = image_signature(np.full((40, 50, 3), 128, dtype=np.uint8))
    assert not flat.structure.any()  # nothing to compare: a flat image is never anyone's near-copy


def test_near_copies_collapse_and_distinct_images_of_the_same_style_stay(tmp_path):
    root = tmp_path / "data"
    for i in range(6):
        _save(_scan(i), root / "cyst" / f"scan{i}.png")
        _save(_scan(100 + i), root / "mass" / f"scan{i}.png")
    _save(_resized(_scan(0), 77), root / "cyst" / "copy_resized.png")
    _save(_scan(1), root / "cyst" / "copy_q60.jpg", quality=60)
    _save(_brighter(_scan(2)), root / "cyst" / "copy_brighter.png")
    _save(_jpeg(_brighter(_resized(_scan(3), 90)), 50), root / "cyst" / "copy_all_three.png")
    # The same scene with its lesion 4 px lower: as alike as two neighbouring slices, within the hash threshold,
    # but a different image, which the structure correlation must keep apart.
    _save(_scan(200, lesion=(0.45, 0.45)), root / "mass" / "slice_a.png")
    _save(_scan(200, lesion=(0.48, 0.45)), root / "mass" / "slice_b.png")
    neighbours = image_signature(_scan(200, lesion=(0.45, 0.45))), image_signature(_scan(200, lesion=(0.48, 0.45)))
    assert bin(neighbours[0].phash ^ neighbours[1].phash).count("1") <= 8

    summary, paths = _prepare(root, tmp_path, test_fraction=0.25)
    pairs = summary["near_duplicates"]["pairs"]
    assert sorted(sorted(_names(p["paths"])) for p in pairs) == [
        ["copy_all_three.png", "scan3.png"], ["copy_brighter.png", "scan2.png"],
        ["copy_q60.jpg", "scan1.png"], ["copy_resized.png", "scan0.png"],
    ]
    assert all(p["kind"] == "duplicate" and p["hash_distance"] <= 8 and p["correlation"] >= 0.97 for p in pairs)
    assert summary["near_duplicate_pairs"] == summary["near_duplicate_groups"] == 4
    assert summary["near_duplicate_files_removed"] == 4 and summary["near_duplicate_label_conflicts"] == 0
    # The first path of each group is kept: the copies sort before the originals.
    assert _names(p for g in summary["near_duplicates"]["groups"] for p in g["removed"]) == {"scan0.png", "scan1.png", "scan2.png", "scan3.png"}
    entries = read_manifest(paths.manifest)
    assert len(entries) == summary["images"] == 14 and {"slice_a.png", "slice_b.png"} <= _names(e.path for e in entries)


def test_near_copy_across_splits_is_removed_from_train_and_test_stays(tmp_path):
    root = tmp_path / "data"
    for split, offset in (("train", 0), ("test", 50)):
        for label, base in (("cyst", 0), ("mass", 500)):
            for i in range(3):
                _save(_scan(base + offset + i), root / split / label / f"scan{i}.png")
    _save(_resized(_scan(50), 100), root / "train" / "cyst" / "from_test.jpg", quality=70)
    summary, paths = _prepare(root, tmp_path)
    assert summary["near_duplicate_leaks"] == 1 and summary["leaked_train_test"] == 0  # not byte-identical
    [group] = summary["near_duplicates"]["groups"]
    assert group["kind"] == "train_test_leak"
    assert [Path(p).relative_to(root).as_posix() for p in group["removed"]] == ["train/cyst/from_test.jpg"]
    assert [Path(p).relative_to(root).as_posix() for p in group["kept"]] == ["test/cyst/scan0.png"]
    entries = read_manifest(paths.manifest)
    assert "train/cyst/from_test.jpg" not in {e.path for e in entries}
    assert Counter(e.split for e in entries) == {"train": 6, "test": 6}


def test_near_copy_with_another_label_is_a_conflict_and_leaves_training(tmp_path):
    root = tmp_path / "data"
    for label, base in (("benign", 0), ("malignant", 100)):
        for i in range(4):
            _save(_scan(base + i), root / label / f"scan{i}.png")
    _save(_brighter(_resized(_scan(0), 96)), root / "malignant" / "filed_twice.png")
    summary, paths = _prepare(root, tmp_path, test_fraction=0.25)
    assert summary["near_duplicate_label_conflicts"] == 1
    [pair] = summary["near_duplicates"]["pairs"]
    assert pair["kind"] == "label_conflict" and sorted(pair["labels"]) == ["benign", "malignant"]
    assert _names(pair["removed"]) == {"scan0.png", "filed_twice.png"}
    assert summary["images"] == 7 and not {"benign/scan0.png", "malignant/filed_twice.png"} & {e.path for e in read_manifest(paths.manifest)}

    gallery = write_near_duplicate_gallery(summary["near_duplicates"]["pairs"], tmp_path / "pairs.png", count=3)
    with Image.open(gallery) as image:
        assert image.width > 200 and image.height > 200
    with pytest.raises(ValueError, match="no near-duplicate pairs"):
        write_near_duplicate_gallery([], tmp_path / "none.png")


def test_near_copy_check_can_be_turned_off_and_refuses_bad_thresholds(tmp_path):
    root = tmp_path / "data"
    for label, base in (("cyst", 0), ("mass", 100)):
        for i in range(3):
            _save(_scan(base + i), root / label / f"scan{i}.png")
    _save(_jpeg(_scan(0), 60), root / "cyst" / "copy.png")
    summary, _ = _prepare(root, tmp_path, test_fraction=0.34, near_duplicate_threshold=None)
    assert summary["near_duplicate_pairs"] == 0 and summary["images"] == 7
    with pytest.raises(ConfigError, match="near_duplicate_threshold"):
        parse_params({"prepare": {"near_duplicate_threshold": 65}})
    with pytest.raises(ConfigError, match="near_duplicate_min_correlation"):
        parse_params({"prepare": {"near_duplicate_min_correlation": 0}})
