"""External test sets (issue 28): images from another source that the training dataset's fits are also tested on.

An external set is test-only: it is never part of a training subset, a validation part or any choice a method makes.
It is processed with exactly the training dataset's specs: its images go into the training dataset's own mask and
feature stores (keyed by content hash; the stores' keys come from the training dataset's spec alone, so adding an
external set changes no key, no manifest, no split and no subset of the training dataset). The segment and features
stages add its images to their work; evaluate reads their features from the same stores.

Files, under ``cache/<dataset>/``:

- ``external.json``: per set its root, classes, the resolved class map, counts, what was left out and why (content
  only: DVC's dependency of segment, features and evaluate; written only when it changes);
- ``external/<NAME>/manifest.csv``: its images (split ``external``), ``external/<NAME>/files.npz``: decoded-file cache;
- ``external.run.json``: what the last preparation was made from (a fingerprint), so an unchanged set is not read again;
- ``external_groups.json``: each set's groups file (``groups``: a CSV naming a group, such as a scanner or an MR
  weighting, per image) and its sha256: evaluate's dependency alone, so editing the groups reruns evaluate and report
  and nothing else. Evaluate reports the set's accuracy per group beside the whole set's.

Classes: an external class is matched to the training class of the same name (compared as prepare compares folder
names), or mapped through ``class_map`` to one or more training classes (coarser labels: ``tumor: [glioma_tumor,
meningioma_tumor, pituitary_tumor]``). A fit's probabilities are summed over each external class's mapped classes; a
training class that no external class maps keeps its own column, so predicting it is an error and shows in the set's
confusion matrix (rows: the external classes; columns: the external classes, then the unmapped training classes). The
prediction is the argmax over those columns.

Copies across sources: an external image whose bytes equal an image of the training dataset (either split), or that is
a near-copy of one (prepare's rule: perceptual hashes within ``near_duplicate_threshold`` bits and structure maps
correlating at least ``near_duplicate_min_correlation``, with the training dataset's prepared settings), is removed
from the EXTERNAL set: the training side keeps the splits and subsets of the internal protocol, so the internal and the
external numbers come from the same fits, and an image the training source holds cannot test transfer to a new
source. Both kinds are counted, with examples, in ``external.json`` and ``metrics.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from medfocus.pipeline.config import ExternalSetParams, Params
from medfocus.pipeline.datasets import DatasetSpec, normalise_class_name
from medfocus.pipeline.images import file_sha256, hamming_pairs, image_signature, load_image
from medfocus.pipeline.manifest import (
    DatasetError,
    Entry,
    collapse_duplicates,
    discover,
    inspect_files,
    load_known_records,
    read_manifest,
    save_known_records,
    split_missing,
    write_json,
    write_manifest,
)
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.preparation import PreparedDataset, known_records_file, listing_fingerprint
from medfocus.pipeline.runner import WorkItem
from medfocus.pipeline.stage_outputs import done_digest, run_file

log = logging.getLogger(__name__)

EXTERNAL_SPLIT = "external"
EXAMPLES = 5
FORMAT = 1  # bump when what external.json records changes


class ExternalSetError(DatasetError):
    """An external set cannot be used as configured (a class map naming an unknown class, an unmatched folder...)."""


@dataclass(frozen=True)
class ExternalSet:
    """One prepared external set: its images (labels are external classes) and its class map onto training classes."""

    name: str
    root: Path
    class_names: list[str]  # the external classes, sorted
    class_map: dict[str, list[str]]  # external class -> training classes
    entries: list[Entry]

    def columns(self, training_classes: list[str]) -> list[str]:
        """The prediction columns: the external classes, then each training class no external class maps."""
        return self.class_names + unmapped_classes(self.class_map, training_classes)

    def image_path(self, entry: Entry) -> Path:
        path = Path(entry.path)
        return path if path.is_absolute() else (self.root / path).resolve()

    def work_items(self) -> list[WorkItem]:
        return [WorkItem(entry.hash, str(self.image_path(entry))) for entry in self.entries]


# ---------------------------------------------------------------------------------------------------- classes
def sets_for(dataset: str, params: Params) -> dict[str, ExternalSetParams]:
    """The external sets configured for ``dataset`` (those with no ``dataset`` apply to every dataset)."""
    return {name: item for name, item in params.evaluate.external.items() if item.dataset in (None, dataset)}


def resolve_class_map(name: str, external_classes: list[str], training_classes: list[str],
                      class_map: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every external class -> the training classes it stands for; a clear error naming what does not fit.

    Listed classes map as listed (each mapped training class must exist, and no training class may be mapped by two
    external classes); the others must match a training class by name (case, spaces and punctuation ignored)."""
    unknown_keys = [c for c in class_map if c not in external_classes]
    if unknown_keys:
        raise ExternalSetError(f"external set {name!r}: class_map names {unknown_keys}, which are not classes of the "
                               f"external set (its class folders: {external_classes})")
    by_key = {normalise_class_name(c): c for c in training_classes}
    resolved: dict[str, list[str]] = {}
    for external in external_classes:
        if external in class_map:
            missing = [c for c in class_map[external] if c not in training_classes]
            if missing:
                raise ExternalSetError(f"external set {name!r}: class_map maps {external!r} to {missing}, which are not "
                                       f"training classes (the training classes: {training_classes})")
            resolved[external] = list(dict.fromkeys(class_map[external]))
        elif normalise_class_name(external) in by_key:
            resolved[external] = [by_key[normalise_class_name(external)]]
        else:
            raise ExternalSetError(f"external set {name!r}: class folder {external!r} matches no training class "
                                   f"{training_classes}; map it with evaluate.external.{name}.class_map")
    seen: dict[str, str] = {}
    for external, training in resolved.items():
        for cls in training:
            if cls in seen:
                raise ExternalSetError(f"external set {name!r}: training class {cls!r} is mapped by both {seen[cls]!r} "
                                       f"and {external!r}; map each training class to one external class")
            seen[cls] = external
    return resolved


def unmapped_classes(class_map: dict[str, list[str]], training_classes: list[str]) -> list[str]:
    mapped = {c for classes in class_map.values() for c in classes}
    return [c for c in training_classes if c not in mapped]


def mapping_matrix(class_map: dict[str, list[str]], external_classes: list[str], training_classes: list[str]) -> np.ndarray:
    """(training classes × prediction columns) 0/1 matrix: ``proba @ matrix`` sums each external class's mapped
    classes and passes each unmapped training class through as its own column."""
    columns = external_classes + unmapped_classes(class_map, training_classes)
    matrix = np.zeros((len(training_classes), len(columns)), dtype=np.float64)
    for column, external in enumerate(external_classes):
        for cls in class_map[external]:
            matrix[training_classes.index(cls), column] = 1.0
    for offset, cls in enumerate(unmapped_classes(class_map, training_classes)):
        matrix[training_classes.index(cls), len(external_classes) + offset] = 1.0
    return matrix


def map_probabilities(proba, matrix: np.ndarray) -> np.ndarray:
    """A fit's (N, training classes) probabilities as (N, prediction columns) (see :func:`mapping_matrix`)."""
    values = proba.detach().cpu().numpy() if hasattr(proba, "detach") else np.asarray(proba)
    return values.astype(np.float64) @ matrix


# ---------------------------------------------------------------------------------------------------- copies
def _training_signatures(prepared: PreparedDataset, paths: DatasetPaths) -> dict[str, object]:
    """hash -> perceptual signature of every image of the training dataset (both splits): from prepare's decoded-file
    cache where it has them, decoded otherwise."""
    wanted = {entry.hash for entry in prepared.entries}
    signatures = {record.hash: record.signature for record in load_known_records(known_records_file(paths)).values()
                  if record.hash in wanted}
    for entry in prepared.entries:
        if entry.hash not in signatures:
            signatures[entry.hash] = image_signature(load_image(prepared.image_path(entry)))
    return signatures


def find_cross_copies(training: list[tuple[str, str, str, object]], external: list, hash_threshold: int | None,
                      min_correlation: float) -> tuple[set[str], dict]:
    """External records (manifest ImageRecords) that are byte or near-copies of a training image.

    ``training``: (hash, path, split, signature) per training-dataset image. Returns the external hashes to remove and
    the report: counts, examples and the full list (external path, training path and split, and for near-copies the
    hash distance and correlation)."""
    by_hash = {digest: (path, split) for digest, path, split, _ in training}
    byte, near = [], []
    removed: set[str] = set()
    for record in external:
        if record.hash in by_hash:
            path, split = by_hash[record.hash]
            byte.append({"external": str(record.file.path), "training": path, "training_split": split})
            removed.add(record.hash)
    remaining = [r for r in external if r.hash not in removed]
    if hash_threshold is not None and training and remaining:
        hashes = np.array([t[3].phash for t in training] + [r.signature.phash for r in remaining], dtype=np.uint64)
        structures = np.stack([t[3].structure for t in training] + [r.signature.structure for r in remaining])
        n = len(training)
        best: dict[int, tuple[float, int, int]] = {}
        for a, b, bits in hamming_pairs(hashes, hash_threshold):
            if (a < n) == (b < n):
                continue  # two training images, or two external ones: not a copy across sources
            train_index, external_index = (a, b) if a < n else (b, a)
            correlation = float(structures[a] @ structures[b])
            if correlation >= min_correlation and correlation > best.get(external_index, (-2.0, 0, 0))[0]:
                best[external_index] = (correlation, train_index, bits)
        for external_index, (correlation, train_index, bits) in sorted(best.items()):
            record = remaining[external_index - n]
            removed.add(record.hash)
            near.append({"external": str(record.file.path), "training": training[train_index][1],
                         "training_split": training[train_index][2], "hash_distance": int(bits),
                         "correlation": round(correlation, 4)})
    report = {
        "removed_from": "external set",
        "why": "an image the training source holds (byte copy or near-copy) cannot test transfer to another source; "
               "the training side keeps the internal protocol's splits and subsets, so internal and external numbers "
               "come from the same fits",
        "byte_copies": len(byte), "near_copies": len(near), "removed": len(byte) + len(near),
        "byte_copy_examples": byte[:EXAMPLES], "near_copy_examples": near[:EXAMPLES],
        "all": [{"kind": "byte copy"} | item for item in byte] + [{"kind": "near-copy"} | item for item in near],
    }
    return removed, report


# ---------------------------------------------------------------------------------------------------- prepare
def _external_spec(name: str, root: Path) -> DatasetSpec:
    return DatasetSpec(name, root, "external test set", (), registered=False)


def _settings_fingerprint(dataset: DatasetSpec, prepared: PreparedDataset, paths: DatasetPaths,
                          sets: dict[str, ExternalSetParams]) -> str:
    digest = hashlib.sha256(f"format {FORMAT}|{dataset.name}|{paths.dir.resolve()}".encode())
    digest.update(Path(__file__).read_bytes())
    digest.update(file_sha256(paths.manifest).encode() if paths.manifest.exists() else b"none")
    digest.update(json.dumps({key: prepared.summary.get("params", {}).get(key)
                              for key in ("near_duplicate_threshold", "near_duplicate_min_correlation")}).encode())
    digest.update(json.dumps(prepared.class_names).encode())
    for name, item in sorted(sets.items()):
        root = Path(item.root).resolve()
        listing = listing_fingerprint(_external_spec(name, root))
        digest.update(f"{name}|{root}|{json.dumps(item.class_map, sort_keys=True)}|{listing}\n".encode())
    return digest.hexdigest()[:16]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path.resolve())


def _prepare_one(name: str, item: ExternalSetParams, prepared: PreparedDataset, paths: DatasetPaths,
                 training: list[tuple[str, str, str, object]], progress: bool) -> dict:
    root = Path(item.root).resolve()
    spec = _external_spec(name, root)
    try:
        _, found, per_folder = discover(spec)
    except DatasetError as error:
        raise ExternalSetError(f"external set {name!r}: {error}") from None
    external_classes = sorted(per_folder)
    class_map = resolve_class_map(name, external_classes, prepared.class_names, item.class_map)
    found, missing = split_missing(found)
    folder = paths.external_dir(name)
    known = load_known_records(folder / "files.npz")
    readable, corrupt = inspect_files(found, progress=progress, known=known)
    save_known_records(folder / "files.npz", readable)
    kept, duplicates = collapse_duplicates(readable, {c: c for c in external_classes})
    settings = prepared.summary.get("params", {})
    removed, copies = find_cross_copies(training, kept, settings.get("near_duplicate_threshold", 8),
                                        settings.get("near_duplicate_min_correlation", 0.97))
    if copies["removed"]:
        log.warning("external set %s: %d byte copies and %d near-copies of %s images removed from the external set",
                    name, copies["byte_copies"], copies["near_copies"], prepared.name)
    entries = sorted((Entry(r.hash, _relative(r.file.path, root), r.file.folder, EXTERNAL_SPLIT, r.width, r.height, r.mode)
                      for r in kept if r.hash not in removed), key=lambda e: (e.label, e.path))
    if not entries:
        raise ExternalSetError(f"external set {name!r}: no image left under {root} (after unreadable files and copies of "
                               f"{prepared.name} images were removed)")
    write_manifest(folder / "manifest.csv", entries)
    return {
        "root": item.root, "classes": external_classes, "class_map": class_map,
        "unmapped_training_classes": unmapped_classes(class_map, prepared.class_names),
        "files_found": len(found) + len(missing), "images": len(entries),
        "counts": dict(sorted(Counter(e.label for e in entries).items())),
        "unreadable": len(corrupt) + len(missing), "unreadable_examples": [c["path"] for c in corrupt + missing][:EXAMPLES],
        "duplicates_within_set": duplicates["duplicate_files_removed"],
        "label_conflicts_within_set": len(duplicates["conflicting_labels"]),
        "copies_of_training_source": copies,
        "manifest_sha256": file_sha256(folder / "manifest.csv"),
    }


def prepare_externals(dataset: DatasetSpec, params: Params, paths: DatasetPaths, prepared: PreparedDataset,
                      progress: bool = False) -> dict:
    """Prepare the external sets of ``dataset`` (``medfocus external`` and the resolve stage; segment, features and
    evaluate call it too, through :func:`load_externals`):
    write ``external.json`` and each set's manifest; return the summary. Nothing is read again, and nothing is
    written, while the sets' files, settings, the training manifest and this code are unchanged."""
    sets = sets_for(dataset.name, params)
    fingerprint = _settings_fingerprint(dataset, prepared, paths, sets)
    run = run_file(paths.external_summary)
    if (paths.external_summary.exists() and run.exists() and read_json(run).get("fingerprint") == fingerprint
            and all((paths.external_dir(name) / "manifest.csv").exists() for name in sets)):
        return read_json(paths.external_summary)
    training: list[tuple[str, str, str, object]] = []
    if sets:
        signatures = _training_signatures(prepared, paths)
        training = [(e.hash, str(prepared.image_path(e)), e.split, signatures[e.hash]) for e in prepared.entries]
    summary = {"dataset": dataset.name, "training_classes": prepared.class_names,
               "sets": {name: _prepare_one(name, item, prepared, paths, training, progress) for name, item in sorted(sets.items())}}
    if not paths.external_summary.exists() or read_json(paths.external_summary) != summary:
        write_json(paths.external_summary, summary)
    write_json(run, {"fingerprint": fingerprint})
    return summary


def load_externals(dataset: DatasetSpec, params: Params, paths: DatasetPaths, prepared: PreparedDataset) -> list[ExternalSet]:
    """The prepared external sets of ``dataset`` (prepared first when their files or settings changed); none, and no
    file touched, when no external set is configured for it."""
    if not sets_for(dataset.name, params):
        return []
    summary = prepare_externals(dataset, params, paths, prepared)
    return [ExternalSet(name, Path(item["root"]).resolve(), list(item["classes"]), dict(item["class_map"]),
                        read_manifest(paths.external_dir(name) / "manifest.csv"))
            for name, item in summary["sets"].items()]


def external_content(sets: list[ExternalSet], done) -> dict:
    """What a per-image stage's content file records of the external sets: per set its images, how many are done in
    the store and a digest of which (``done``: the store's ``done``)."""
    out = {}
    for external in sets:
        finished = done([entry.hash for entry in external.entries])
        out[external.name] = {"images": len(external.entries), "done": len(finished), "done_digest": done_digest(finished)}
    return out


def external_work_items(prepared: PreparedDataset, sets: list[ExternalSet]) -> list[WorkItem]:
    """The external sets' images that the training dataset does not already hold (each image once)."""
    seen = {entry.hash for entry in prepared.entries}
    items = []
    for external in sets:
        for item in external.work_items():
            if item.hash not in seen:
                seen.add(item.hash)
                items.append(item)
    return items


# ---------------------------------------------------------------------------------------------------- groups
GROUP_COLUMNS = ("path", "group")
UNLISTED_GROUP = "unlisted"


@dataclass(frozen=True)
class ExternalGroups:
    """The group of each image of an external set (in its entries' order) and how many rows of the file named none."""

    of_image: list[str]
    rows_naming_no_image: int


def _relative_to_root(external: ExternalSet, text: str) -> str:
    """A groups file's path as the set's manifest writes it: ``/`` separators, relative to the set's root."""
    path = Path(text.strip().replace("\\", "/"))
    if path.is_absolute():
        try:
            path = path.relative_to(external.root)
        except ValueError:
            return path.as_posix()
    return path.as_posix()


def read_groups(external: ExternalSet, groups_file: str) -> ExternalGroups:
    """The groups of ``external``'s images from a CSV with columns ``path`` (as under the set's root; absolute paths
    under it and ``\\`` separators are accepted) and ``group``; an image the file does not list is in
    :data:`UNLISTED_GROUP`, and rows naming no image of the set (e.g. a copy of a training image, removed) are counted.
    A missing file or column, a row without path or group, a group named like :data:`UNLISTED_GROUP`, a path given two
    groups, or a file naming no image of the set is an :class:`ExternalSetError` naming it."""
    path = Path(groups_file)
    where = f"external set {external.name!r}: groups file {groups_file}"
    if not path.is_file():
        raise ExternalSetError(f"{where} not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        lacking = [column for column in GROUP_COLUMNS if column not in reader.fieldnames]
        if lacking:
            raise ExternalSetError(f"{where} lacks column(s) {', '.join(lacking)} (it needs {', '.join(GROUP_COLUMNS)})")
        group_of: dict[str, str] = {}
        for row in reader:
            image, group = (row["path"] or "").strip(), (row["group"] or "").strip()
            if not image or not group:
                raise ExternalSetError(f"{where}, line {reader.line_num}: a row needs both a path and a group")
            if group == UNLISTED_GROUP:
                raise ExternalSetError(f"{where}, line {reader.line_num}: the group name {UNLISTED_GROUP!r} is kept for the "
                                       "images the file does not list")
            image = _relative_to_root(external, image)
            if group_of.setdefault(image, group) != group:
                raise ExternalSetError(f"{where} gives {image} two groups ({group_of[image]!r} and {group!r})")
    in_set = {Path(entry.path).as_posix() for entry in external.entries}
    if group_of and not in_set & set(group_of):
        raise ExternalSetError(f"{where} names no image of the set (paths are relative to {external.root}, e.g. "
                               f"{external.entries[0].path}; the file has e.g. {next(iter(group_of))})")
    unmatched = sum(1 for image in group_of if image not in in_set)
    if unmatched:
        log.warning("%s: %d row(s) name no image of the set (not found, or removed as copies of training images)", where,
                    unmatched)
    return ExternalGroups([group_of.get(Path(entry.path).as_posix(), UNLISTED_GROUP) for entry in external.entries], unmatched)


def write_groups_summary(sets: list[ExternalSet], params: Params, paths: DatasetPaths, dataset: str) -> dict:
    """``external_groups.json``: per external set with ``groups``, the file, its sha256 and its images per group
    (rewritten only when that changes, so evaluate reruns exactly when a groups file does). Each file is read here,
    so a bad one stops the pipeline before segment and features run."""
    configured = sets_for(dataset, params)
    summary = {}
    for external in sets:
        groups_file = configured[external.name].groups
        if groups_file is None:
            continue
        groups = read_groups(external, groups_file)
        summary[external.name] = {"file": groups_file, "sha256": file_sha256(groups_file),
                                  "images": dict(sorted(Counter(groups.of_image).items())),
                                  "rows_naming_no_image": groups.rows_naming_no_image}
    if not paths.external_groups.exists() or read_json(paths.external_groups) != summary:
        write_json(paths.external_groups, summary)
    return summary
