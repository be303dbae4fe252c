"""A dataset prepared: ``medfocus prepare``'s work (decode, hash, de-duplicate, split: ``cache/<dataset>/manifest.csv``,
``splits.json``, ``prepare.json``) and the prepared dataset every later stage reads, with its work items."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from medfocus.pipeline.config import ConfigError, Params, PrepareParams
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.images import file_sha256, load_image
from medfocus.pipeline.manifest import (
    DatasetError,
    Entry,
    FoundFile,
    collapse_duplicates,
    discover,
    file_identity,
    find_near_duplicates,
    inspect_files,
    load_known_records,
    match_classes,
    read_manifest,
    require_two_classes,
    save_known_records,
    split_missing,
    stratified_test_split,
    training_subsets,
    write_json,
    write_manifest,
)
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.runner import WorkItem
from medfocus.pipeline.stage_outputs import run_file
from pydantic import ValidationError

log = logging.getLogger(__name__)


def _relative(path: Path, root: Path) -> str:
    base = root.parent if root.is_file() else root
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path.resolve())


def listing_fingerprint(spec: DatasetSpec) -> str:
    """A cheap hash of which files the dataset has and of each one's version (path, size, mtime, inode, ctime: see
    :func:`~medfocus.pipeline.manifest.file_identity`), to notice added, removed, replaced or rewritten files without
    reading them. ``medfocus prepare --rehash`` reads every file whatever this says."""
    try:
        _, found, _ = discover(spec)
    except DatasetError:
        return "absent"
    return _fingerprint(found)


def _fingerprint(found: list[FoundFile]) -> str:
    digest = hashlib.sha256()
    for item in found:
        try:
            identity = file_identity(item.path)
        except OSError:
            identity = "missing"  # a CSV row naming no file: prepare reports it
        digest.update(f"{item.path}|{item.folder}|{item.split}|{identity}\n".encode())
    return digest.hexdigest()[:16]


def known_records_file(paths: DatasetPaths) -> Path:
    """Where prepare keeps each file's hash, size and signature by file identity, so that the next prepare reads only
    new or changed files (a cache: deleting it costs one full read)."""
    return paths.prepare_summary.with_name("prepare.files.npz")


def _ensure_demo(spec: DatasetSpec, params: Params) -> None:
    if spec.name == "demo" and spec.registered:
        from medfocus.pipeline.demo import ensure_demo

        ensure_demo(spec.root, images_per_class=params.prepare.demo_images_per_class)


def prepare_dataset(spec: DatasetSpec, params: Params, paths: DatasetPaths, progress: bool = True, rehash: bool = False) -> dict:
    """Build the manifest, splits and summary of ``spec``; returns the summary written to prepare.json.

    Files whose identity (path, size, mtime, inode, ctime) is unchanged since the last prepare are not read again;
    ``rehash`` reads, decodes and hashes every file regardless.
    """
    started = time.perf_counter()
    settings = params.prepare
    _ensure_demo(spec, params)
    layout, found, files_per_folder = discover(spec)
    listing = _fingerprint(found)
    found, missing_files = split_missing(found)
    for item in missing_files:
        log.warning("skipped missing file: %s", item["reason"])
    empty = sorted(folder for folder, count in files_per_folder.items() if count == 0)
    if empty:
        raise DatasetError(
            f"dataset {spec.name!r}: class folder(s) {empty} under {spec.root} are empty; add images or remove the folder"
        )
    spec, folder_to_class = match_classes(spec, sorted(files_per_folder))
    known = {} if rehash else load_known_records(known_records_file(paths))
    readable, corrupt = inspect_files(found, progress=progress, known=known)
    save_known_records(known_records_file(paths), readable)
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
    if len(spec.class_names) < 2:
        warnings.append(f"dataset {spec.name!r} has one class ({', '.join(map(repr, spec.class_names))}): it can be segmented "
                        "and encoded, but train and evaluate need at least two classes")
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
        "missing": missing_files,
        "missing_count": len(missing_files),
        **duplicates,
        **near_duplicates,
        "warnings": list(dict.fromkeys(warnings)),
        "params": settings.model_dump(),
        "subsets": {"fractions": settings.fractions, "shots": settings.shots, "seeds": settings.subset_seeds},
    }
    write_json(paths.prepare_summary, summary)
    # How this run went, apart from the content later stages depend on: a prepare that finds the same images (after a
    # copy, a touch, another run) leaves prepare.json as it was, so DVC reruns nothing downstream.
    write_json(run_file(paths.prepare_summary), {"listing": listing, "seconds": round(time.perf_counter() - started, 3)})
    return summary


@dataclass(frozen=True)
class PreparedDataset:
    name: str
    root: Path
    entries: list[Entry]
    summary: dict

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.summary["classes"]]

    @property
    def prompts(self) -> dict[str, list[str]]:
        return {c["name"]: list(c["prompts"]) for c in self.summary["classes"]}

    def image_path(self, entry: Entry) -> Path:
        path = Path(entry.path)
        if path.is_absolute():
            return path
        base = self.root.parent if self.root.suffix.lower() == ".csv" else self.root
        return (base / path).resolve()

    def work_items(self) -> list[WorkItem]:
        return [WorkItem(entry.hash, str(self.image_path(entry))) for entry in self.entries]

    def require_two_classes(self) -> None:
        """Train and evaluate refuse a dataset with one class (:class:`~medfocus.pipeline.manifest.SingleClassError`)."""
        require_two_classes(self.name, self.class_names)

    def unreadable(self) -> list[dict]:
        """Files prepare could not decode, as failure records of the per-image stages (they never reach a store)."""
        return ([{"hash": None, "path": item["path"], "reason": f"unreadable, left out by prepare: {item['reason']}"}
                 for item in self.summary.get("corrupt", [])]
                + [{"hash": None, "path": item["path"], "reason": f"missing, left out by prepare: {item['reason']}"}
                   for item in self.summary.get("missing", [])])


class ImageChangedError(ValueError):
    """The file no longer has the content its manifest hash names."""


def load_manifest_image(item: WorkItem) -> np.ndarray:
    """Decode a work item's image after checking that the file still holds the content its hash names.

    Results are stored under that hash, so a file rewritten since prepare (with its size and time kept, which hides it
    from prepare's listing check) must fail here rather than file its results under another image's hash.
    """
    digest = file_sha256(item.path)
    if digest != item.hash:
        raise ImageChangedError(
            f"the file changed since `medfocus prepare` (sha256 {digest[:12]}…, the manifest says {item.hash[:12]}…): "
            "run `medfocus prepare` again"
        )
    return load_image(item.path)


def load_prepared(spec: DatasetSpec, params: Params, paths: DatasetPaths, progress: bool = True) -> PreparedDataset:
    """The dataset's manifest. Which test split and subsets a dataset has is decided by ``medfocus prepare`` alone.

    - No manifest yet: prepare first, with params.yaml's ``prepare`` section.
    - The manifest is out of date (image files added, removed or rewritten, another root, other class definitions):
      prepare again, logged, with the settings the manifest was made with, so that an explicit
      ``medfocus prepare --test-fraction 0.3`` keeps its split.
    - params.yaml's ``prepare`` section differs from the manifest's settings: the manifest is used as it is, and a
      warning names the differing keys and the ``medfocus prepare`` command that applies params.yaml.
    """
    if not (paths.prepare_summary.exists() and paths.manifest.exists()):
        log.info("preparing %s from %s first (no manifest yet)", spec.name, spec.root)
        summary = prepare_dataset(spec, params, paths, progress=progress)
        return PreparedDataset(spec.name, Path(summary["root"]), read_manifest(paths.manifest), summary)

    summary = read_json(paths.prepare_summary)
    prepared_with = _prepared_settings(summary, paths)
    run = run_file(paths.prepare_summary)
    recorded_listing = read_json(run).get("listing") if run.exists() else None
    out_of_date = _why_out_of_date(summary, spec, recorded_listing, listing_fingerprint(spec))
    if out_of_date:
        log.info("preparing %s from %s again (%s), with the settings of its last prepare", spec.name, spec.root, out_of_date)
        summary = prepare_dataset(spec, params.model_copy(update={"prepare": prepared_with}), paths, progress=progress)
    else:
        differing = {key: (getattr(prepared_with, key), getattr(params.prepare, key))
                     for key in PrepareParams.model_fields if getattr(prepared_with, key) != getattr(params.prepare, key)}
        if differing:
            log.warning(
                "%s was prepared with %s, the params say %s; using it as prepared. To prepare it with the params: "
                "medfocus prepare --dataset %s --root %s", paths.prepare_summary,
                ", ".join(f"prepare.{key}={made!r}" for key, (made, _) in differing.items()),
                ", ".join(f"{wanted!r}" for _, wanted in differing.values()), spec.name, spec.root,
            )
    return PreparedDataset(spec.name, Path(summary["root"]), read_manifest(paths.manifest), summary)


def _prepared_settings(summary: dict, paths: DatasetPaths) -> PrepareParams:
    """The prepare settings a manifest was made with; settings added to medfocus since then take their defaults."""
    recorded = {key: value for key, value in summary.get("params", {}).items() if key in PrepareParams.model_fields}
    try:
        return PrepareParams.model_validate(recorded)
    except ValidationError as error:
        raise ConfigError(
            f"{paths.prepare_summary}: its prepare settings are no longer valid ({error.errors()[0]['msg']}); "
            f"run `medfocus prepare --dataset {summary.get('dataset', paths.dataset)}` again"
        ) from None


def _why_out_of_date(summary: dict, spec: DatasetSpec, recorded_listing: str | None, listing: str) -> str:
    """Why a manifest no longer describes the dataset's files and classes, or '' when it still does."""
    if Path(summary["root"]).resolve() != Path(spec.root).resolve():
        return f"it was made from {summary['root']}"
    if recorded_listing != listing:
        return "image files were added, removed or changed"
    # Ad-hoc datasets take their classes from the folders, which the listing covers; defined ones carry their prompts.
    if spec.classes and summary.get("classes") != json.loads(json.dumps([asdict(c) for c in spec.classes])):
        return "its class definitions (names, folders or prompts) changed"
    return ""
