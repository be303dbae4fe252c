"""The embedded demo dataset: layout, determinism, idempotence, repair, and where its class signal lives."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfocus.pipeline.demo import (
    DEMO_CLASSES,
    DEMO_MANIFEST,
    DEMO_PROMPTS,
    LESION_MASKS_FOLDER,
    ensure_demo,
    generate_demo,
    render_demo_sample,
)
from medfocus.pipeline.images import file_sha256

SIZE = 64


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """A small demo generated once; tests that change files work on copies they make themselves."""
    root = tmp_path_factory.mktemp("reference") / "demo"
    return root, generate_demo(root, images_per_class=4, size=SIZE, seed=3)


def test_classes_and_prompts_are_folder_safe_and_complete():
    assert len(DEMO_CLASSES) == 3 and len(set(DEMO_CLASSES)) == 3
    assert all(re.fullmatch(r"[a-z][a-z_]*", name) for name in DEMO_CLASSES)
    assert set(DEMO_PROMPTS) == set(DEMO_CLASSES)
    for name, prompts in DEMO_PROMPTS.items():
        assert len(prompts) >= 3 and len(set(prompts)) == len(prompts)
        assert all("ultrasound" in p or "sonogram" in p for p in prompts)


def test_layout_counts_and_masks(reference):
    root, summary = reference
    assert summary["counts"] == {name: 4 for name in DEMO_CLASSES}
    assert summary["params"] == {"images_per_class": 4, "size": SIZE, "seed": 3}
    for name in DEMO_CLASSES:
        images = sorted(p.name for p in (root / name).iterdir())
        assert images == [f"{name}_{i:03d}.png" for i in range(4)]
        for image_name in images:
            with Image.open(root / name / image_name) as image:
                assert image.size == (SIZE, SIZE) and image.mode == "L"
            mask = np.asarray(Image.open(root / LESION_MASKS_FOLDER / name / image_name.replace(".png", "_mask.png")))
            assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}
    stored = json.loads((root / DEMO_MANIFEST).read_text())
    on_disk = {p for p in _all_files(root) if p != DEMO_MANIFEST}
    assert set(stored["files"]) == on_disk and len(on_disk) == 2 * 3 * 4
    assert all(file_sha256(root / rel) == digest for rel, digest in stored["files"].items())
    assert [s["class"] for s in stored["samples"]].count("nodule") == 4


def test_same_arguments_give_byte_identical_files(reference, tmp_path):
    root, _ = reference
    other = tmp_path / "elsewhere"
    generate_demo(other, images_per_class=4, size=SIZE, seed=3)
    assert _all_files(other) == _all_files(root)
    different_seed = tmp_path / "seed4"
    generate_demo(different_seed, images_per_class=4, size=SIZE, seed=4)
    assert (different_seed / "cyst" / "cyst_000.png").read_bytes() != (root / "cyst" / "cyst_000.png").read_bytes()


def test_second_call_writes_nothing(reference):
    root, _ = reference
    before = _mtimes(root)
    summary = generate_demo(root, images_per_class=4, size=SIZE, seed=3)
    assert ensure_demo(root, images_per_class=4, size=SIZE, seed=3) == root
    assert summary["files_written"] == 0
    assert _mtimes(root) == before


def test_recovers_from_a_half_written_state(reference, tmp_path):
    root, _ = reference
    broken = tmp_path / "broken"
    for relative, data in _all_files(root).items():
        (broken / relative).parent.mkdir(parents=True, exist_ok=True)
        (broken / relative).write_bytes(data)
    (broken / DEMO_MANIFEST).unlink()
    (broken / "nodule" / "nodule_002.png").unlink()
    corrupt = broken / "spiculated_mass" / "spiculated_mass_001.png"
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    (broken / "cyst" / ".cyst_003.png.999.tmp").write_bytes(b"left by a killed run")
    untouched = broken / "cyst" / "cyst_000.png"
    old_time = untouched.stat().st_mtime_ns - 10**9
    os.utime(untouched, ns=(old_time, old_time))

    summary = generate_demo(broken, images_per_class=4, size=SIZE, seed=3)
    assert summary["files_written"] == 3  # the deleted image, the corrupt one, demo.json
    assert _all_files(broken) == _all_files(root)
    assert untouched.stat().st_mtime_ns == old_time


def test_more_images_keep_existing_ones_and_fewer_remove_the_rest(reference, tmp_path):
    root, _ = reference
    grown = tmp_path / "grown"
    generate_demo(grown, images_per_class=5, size=SIZE, seed=3)
    for relative, data in _all_files(root).items():
        if relative != DEMO_MANIFEST:
            assert (grown / relative).read_bytes() == data
    assert (grown / "cyst" / "cyst_004.png").is_file()
    generate_demo(grown, images_per_class=4, size=SIZE, seed=3)
    assert _all_files(grown) == _all_files(root)


def test_lesion_is_small_non_empty_and_inside_the_organ(reference):
    root, _ = reference
    for class_index, name in enumerate(DEMO_CLASSES):
        for index in range(4):
            sample = render_demo_sample(class_index, index, size=128, seed=3)
            assert sample.class_name == name
            assert 0.01 < sample.lesion_mask.mean() < 0.06
            assert not (sample.lesion_mask & ~sample.organ_mask).any()
            assert 1 <= len(sample.distractor_classes) <= 3
            on_disk = np.asarray(Image.open(root / LESION_MASKS_FOLDER / name / f"{name}_{index:03d}_mask.png")) > 0
            assert np.array_equal(on_disk, render_demo_sample(class_index, index, size=SIZE, seed=3).lesion_mask)


def _leave_one_out_nearest_centroid(features: np.ndarray, labels: np.ndarray) -> float:
    features = (features - features.mean(axis=0)) / features.std(axis=0)
    correct = 0
    for held_out in range(len(labels)):
        rest = np.arange(len(labels)) != held_out
        centroids = np.stack([features[rest & (labels == c)].mean(axis=0) for c in range(len(DEMO_CLASSES))])
        correct += int(np.argmin(((centroids - features[held_out]) ** 2).sum(axis=1)) == labels[held_out])
    return correct / len(labels)


def test_class_signal_lives_in_the_lesion_not_in_global_statistics():
    global_features, lesion_features, lesion_means, labels = [], [], [], []
    for class_index in range(len(DEMO_CLASSES)):
        for index in range(10):
            sample = render_demo_sample(class_index, index, size=128, seed=0)
            image, mask = sample.image.astype(np.float64), sample.lesion_mask
            interior = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
            texture = image[mask].std() / image[mask].mean()
            outline = (mask & ~interior).sum() / np.sqrt(mask.sum())
            surroundings = image[sample.organ_mask & ~mask].mean()
            global_features.append([image.mean(), image.std()])
            lesion_features.append([texture, outline])
            lesion_means.append(image[mask].mean() / surroundings)
            labels.append(class_index)
    labels_array = np.array(labels)
    global_accuracy = _leave_one_out_nearest_centroid(np.array(global_features), labels_array)
    lesion_accuracy = _leave_one_out_nearest_centroid(np.array(lesion_features), labels_array)
    assert lesion_accuracy >= 0.85
    assert global_accuracy <= 0.6
    assert lesion_accuracy - global_accuracy >= 0.4
    # Every class's lesion is about equally darker than its organ: brightness alone does not name the class.
    per_class = [np.mean(np.array(lesion_means)[labels_array == c]) for c in range(len(DEMO_CLASSES))]
    assert max(per_class) - min(per_class) < 0.15


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="size"):
        generate_demo(tmp_path / "tiny", images_per_class=2, size=16)
    with pytest.raises(ValueError, match="images_per_class"):
        generate_demo(tmp_path / "none", images_per_class=0, size=SIZE)
    assert not (tmp_path / "tiny").exists()
