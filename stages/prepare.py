"""The prepare stage: dataset folder -> ``cache/<dataset>/manifest.csv``, ``splits.json`` and the ``prepare.json`` summary."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.manifest import (
    DatasetError,
    Entry,
    FoundFile,
    collapse_duplicates,
    discover,
    find_near_duplicates,
    inspect_files,
    match_classes,
    stratified_test_split,
    training_subsets,
    write_json,
    write_manifest,
)
from medfocus.pipeline.paths import DatasetPaths

log = logging.getLogger(__name__)


def _relative(path: Path, root: Path) -> str:
    base = root.parent if root.is_file() else root
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path.resolve())


def listing_fingerprint(spec: DatasetSpec) -> str:
    """A cheap hash of which files the dataset has (names, sizes, modification times), to notice added or changed files."""
    try:
        _, found, _ = discover(spec)
    except DatasetError:
        return "absent"
    return _fingerprint(found)


def _fingerprint(found: list[FoundFile]) -> str:
    digest = hashlib.sha256()
    for item in found:
        stat = item.path.stat()
        digest.update(f"{item.path}|{item.folder}|{item.split}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _ensure_demo(spec: DatasetSpec, params: Params) -> None:
    if spec.name == "demo" and spec.registered:
        from medfocus.pipeline.demo import ensure_demo

        ensure_demo(spec.root, images_per_class=params.prepare.demo_images_per_class)


def prepare(spec: DatasetSpec, params: Params, paths: DatasetPaths, progress: bool = True) -> dict:
    """Build the manifest, splits and summary of ``spec``; returns the summary written to prepare.json."""
    started = time.perf_counter()
    settings = params.prepare
    _ensure_demo(spec, params)
    layout, found, files_per_folder = discover(spec)
    listing = _fingerprint(found)
    empty = sorted(folder for folder, count in files_per_folder.items() if count == 0)
    if empty:
        raise DatasetError(
            f"dataset {spec.name!r}: class folder(s) {empty} under {spec.root} are empty; add images or remove the folder"
        )
    spec, folder_to_class = match_classes(spec, sorted(files_per_folder))
    readable, corrupt = inspect_files(found, progress=progress)
    for item in corrupt:
        log.warning("skipped unreadable file %s: %s", item["path"], item["reason"])
    kept, duplicates = collapse_duplicates(readable, folder_to_class)
    # Before the split: near-copies of one image are collapsed first, so a random split cannot leak them.
    kept, near_duplicates = find_near_duplicates(kept, folder_to_class, settings.near_duplicate_threshold,
                                                 settings.near_duplicate_min_correlation)
    if near_duplicates["near_duplicate_groups"]:
        log.warning("%d group(s) of near-copies: %d train image(s) removed (%d of them near-copies of a test image), "
                    "%d label conflict(s); every pair is listed in %s", near_duplicates["near_duplicate_groups"],
                    near_duplicates["near_duplicate_files_removed"], near_duplicates["near_duplicate_leaks"],
                    near_duplicates["near_duplicate_label_conflicts"], paths.prepare_summary)

    labels = {record.hash: folder_to_class[record.file.folder] for record in kept}
    warnings: list[str] = []
    has_test = any(record.file.split == "test" for record in kept)
    if has_test:
        split_of = {record.hash: (record.file.split or "train") for record in kept}
    else:
        split_of, warnings = stratified_test_split(labels, settings.test_fraction, settings.seed)
    entries = sorted(
        (Entry(r.hash, _relative(r.file.path, spec.root), labels[r.hash], split_of[r.hash], r.width, r.height, r.mode)
         for r in kept),
        key=lambda e: (e.split, e.label, e.path),
    )
    counts = {split: dict(sorted(Counter(e.label for e in entries if e.split == split).items())) for split in ("train", "test")}
    missing = [c for c in spec.class_names if counts["train"].get(c, 0) == 0]
    if missing:
        raise DatasetError(f"dataset {spec.name!r}: no readable training image for class(es) {missing}")
    for label in spec.class_names:
        total = counts["train"].get(label, 0) + counts["test"].get(label, 0)
        if total < 2:
            warnings.append(f"class {label!r} has only {total} readable image(s)")
    for message in dict.fromkeys(warnings):
        log.warning("%s", message)

    train = [e for e in entries if e.split == "train"]
    subsets = training_subsets(train, settings.fractions, settings.shots, settings.subset_seeds)
    write_manifest(paths.manifest, entries)
    write_json(paths.splits, subsets)
    summary = {
        "dataset": spec.name,
        "root": str(spec.root),
        "layout": layout,
        "modality": spec.modality,
        "classes": [asdict(c) for c in spec.classes],
        "files_found": len(found),
        "images": len(entries),
        "counts": counts,
        "test_split": "from dataset" if has_test else f"stratified, fraction {settings.test_fraction}, seed {settings.seed}",
        "corrupt": corrupt,
        "corrupt_count": len(corrupt),
        **duplicates,
        **near_duplicates,
        "warnings": list(dict.fromkeys(warnings)),
        "listing": listing,
        "params": settings.model_dump(),
        "subsets": {"fractions": settings.fractions, "shots": settings.shots, "seeds": settings.subset_seeds},
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(paths.prepare_summary, summary)
    return summary
