"""load_prepared never replaces the prepare settings of an explicit `medfocus prepare`; it re-prepares only stale manifests."""

from __future__ import annotations

import json
import logging

from medfocus.pipeline.config import parse_params
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.manifest import stratified_test_split
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.preparation import load_prepared
from medfocus.stages.prepare import prepare

from .conftest import write_image


def _test_counts(prepared) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in prepared.entries:
        if entry.split == "test":
            counts[entry.label] = counts.get(entry.label, 0) + 1
    return counts


def _rule_counts(prepared, test_fraction: float) -> dict[str, int]:
    """Test images per class that the split rule gives these images at ``test_fraction`` (prepare.seed 0): each
    image's split is its own hash draw, so the counts are about, not exactly, the fraction."""
    split, _ = stratified_test_split({entry.hash: entry.label for entry in prepared.entries}, test_fraction, seed=0)
    counts: dict[str, int] = {}
    for entry in prepared.entries:
        if split[entry.hash] == "test":
            counts[entry.label] = counts.get(entry.label, 0) + 1
    return counts


def _prepare_explicitly(folder_dataset, tmp_path, test_fraction: float):
    """What `medfocus prepare --test-fraction F` does: params.yaml's prepare section overridden by the option."""
    spec = resolve_dataset("knee", folder_dataset)
    paths = DatasetPaths("knee", tmp_path / "cache")
    prepare(spec, parse_params({}, overrides={"prepare.test_fraction": test_fraction}), paths, progress=False)
    return spec, paths


def test_no_manifest_prepares_with_the_params(folder_dataset, tmp_path):
    spec = resolve_dataset("knee", folder_dataset)
    paths = DatasetPaths("knee", tmp_path / "cache")
    prepared = load_prepared(spec, parse_params({"prepare": {"test_fraction": 0.5}}), paths, progress=False)
    assert paths.manifest.exists()
    assert _test_counts(prepared) == _rule_counts(prepared, 0.5) != _rule_counts(prepared, 0.2)


def test_an_explicit_prepare_is_kept_when_the_params_differ(folder_dataset, tmp_path, caplog):
    spec, paths = _prepare_explicitly(folder_dataset, tmp_path, test_fraction=0.5)
    manifest_before = paths.manifest.read_bytes()

    with caplog.at_level(logging.WARNING, logger="medfocus.pipeline.preparation"):
        prepared = load_prepared(spec, parse_params({}), paths, progress=False)  # params say test_fraction 0.2

    assert paths.manifest.read_bytes() == manifest_before
    assert _test_counts(prepared) == _rule_counts(prepared, 0.5) != _rule_counts(prepared, 0.2)
    warning = caplog.text
    assert "prepare.test_fraction=0.5" in warning and "0.2" in warning
    assert "medfocus prepare --dataset knee" in warning


def test_changed_images_are_prepared_again_with_the_manifests_own_settings(folder_dataset, tmp_path, caplog):
    spec, paths = _prepare_explicitly(folder_dataset, tmp_path, test_fraction=0.5)
    write_image(folder_dataset / "alpha" / "alpha_new.png", seed=999)

    with caplog.at_level(logging.INFO, logger="medfocus.pipeline.preparation"):
        prepared = load_prepared(spec, parse_params({}), paths, progress=False)

    assert "image files were added, removed or changed" in caplog.text
    assert any(entry.path.endswith("alpha_new.png") for entry in prepared.entries)
    assert json.loads(paths.prepare_summary.read_text())["params"]["test_fraction"] == 0.5
    assert sum(_test_counts(prepared).values()) >= 9  # half of 19 images, not a fifth


def test_edited_class_prompts_prepare_again_and_are_used(folder_dataset, tmp_path):
    def params_with(prompt: str):
        return parse_params({"custom_datasets": {"knee": {"root": str(folder_dataset), "classes": [
            {"name": "alpha", "prompts": [prompt]}, {"name": "beta"}, {"name": "gamma"}]}}})

    paths = DatasetPaths("knee", tmp_path / "cache")
    first = params_with("an alpha knee")
    load_prepared(resolve_dataset("knee", params=first), first, paths, progress=False)
    edited = params_with("a knee with alpha signs")
    prepared = load_prepared(resolve_dataset("knee", params=edited), edited, paths, progress=False)
    assert prepared.prompts["alpha"] == ["a knee with alpha signs"]


def test_a_manifest_from_before_a_new_prepare_setting_is_not_stale(folder_dataset, tmp_path, caplog):
    """A setting added to medfocus later is absent from older prepare.json files: its default applies, silently."""
    spec, paths = _prepare_explicitly(folder_dataset, tmp_path, test_fraction=0.2)
    summary = json.loads(paths.prepare_summary.read_text())
    del summary["params"]["demo_images_per_class"]
    paths.prepare_summary.write_text(json.dumps(summary))
    manifest_before = paths.manifest.read_bytes()

    with caplog.at_level(logging.INFO, logger="medfocus.pipeline.preparation"):
        load_prepared(spec, parse_params({}), paths, progress=False)

    assert paths.manifest.read_bytes() == manifest_before
    assert not [record for record in caplog.records if record.name == "medfocus.pipeline.preparation"]


def test_a_touched_file_is_prepared_again_without_changing_what_later_stages_depend_on(folder_dataset, tmp_path, caplog):
    """A copy or a touch changes a file's listing (ctime) but not its content: prepare runs again and finds the same
    images, and prepare.json, manifest.csv and splits.json keep their bytes, so DVC reruns nothing downstream."""
    import os

    spec = resolve_dataset("knee", folder_dataset)
    paths = DatasetPaths("knee", tmp_path / "cache")
    load_prepared(spec, parse_params({}), paths, progress=False)
    before = {path: path.read_bytes() for path in (paths.prepare_summary, paths.manifest, paths.splits)}
    touched = sorted(folder_dataset.rglob("*.png"))[0]
    os.utime(touched)  # new mtime (and ctime), same bytes
    with caplog.at_level(logging.INFO, logger="medfocus.pipeline.preparation"):
        load_prepared(spec, parse_params({}), paths, progress=False)
    assert any("again" in record.getMessage() for record in caplog.records)  # it did look again
    assert {path: path.read_bytes() for path in before} == before
