"""Dataset manifests: which images a dataset has, their content hashes, labels, splits and training subsets.

Layouts understood:
- ``root/<class>/...`` (no split: a stratified, seeded test split is made),
- ``root/train/<class>/...`` with or without ``root/test/<class>/...``,
- a CSV file ``path,label[,split]`` (paths relative to the CSV's folder).

Every file is decoded once; what does not decode is listed and skipped. Byte-identical files are collapsed; one that
sits in both train and test stays in test only and is reported as leakage. Near-copies (resized, re-encoded, brighter)
are found by a perceptual hash and a structure correlation, see :func:`find_near_duplicates`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import ClassSpec, DatasetSpec, generic_prompts, normalise_class_name
from .images import ImageDecodeError, ImageSignature, file_sha256, hamming_pairs, image_signature, is_dicom, load_image

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
MANIFEST_COLUMNS = ("hash", "path", "label", "split", "width", "height", "mode")


class DatasetError(ValueError):
    """The dataset cannot be used as it is; the message says what to change."""


@dataclass(frozen=True)
class FoundFile:
    path: Path
    folder: str  # the class as the folder or CSV names it
    split: str | None


@dataclass(frozen=True)
class ImageRecord:
    """A file that decoded: its content hash, size, source mode and perceptual signature."""

    file: FoundFile
    hash: str
    width: int
    height: int
    mode: str
    signature: ImageSignature


@dataclass(frozen=True)
class Entry:
    hash: str
    path: str
    label: str
    split: str
    width: int
    height: int
    mode: str


# ---------------------------------------------------------------------------------------------------- discovery
def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_folders(parent: Path, ignore: tuple[str, ...]) -> list[Path]:
    ignored = {normalise_class_name(name) for name in ignore}
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".") and normalise_class_name(p.name) not in ignored)


def _discover_csv(csv_path: Path) -> tuple[list[FoundFile], dict[str, int]]:
    found: list[FoundFile] = []
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or ())
        if not {"path", "label"} <= fields:
            raise DatasetError(f"{csv_path}: the CSV needs a header with columns path,label[,split]; found {sorted(fields)}")
        for line, row in enumerate(reader, start=2):
            split = (row.get("split") or "").strip().lower() or None
            if split is not None and split not in SPLITS:
                raise DatasetError(f"{csv_path}:{line}: split {split!r} must be one of {SPLITS} or empty")
            label = (row.get("label") or "").strip()
            if not label:
                raise DatasetError(f"{csv_path}:{line}: empty label")
            found.append(FoundFile((csv_path.parent / row["path"].strip()), label, split))
    per_class: dict[str, int] = defaultdict(int)
    for item in found:
        per_class[item.folder] += 1
    return found, dict(per_class)


def discover(spec: DatasetSpec) -> tuple[str, list[FoundFile], dict[str, int]]:
    """Find the files of a dataset: (layout, files, files per class folder, including empty folders)."""
    root = spec.root
    if root.is_file() and root.suffix.lower() == ".csv":
        found, per_class = _discover_csv(root)
        return "csv", found, per_class
    if not root.is_dir():
        raise DatasetError(f"dataset {spec.name!r}: root {root} does not exist (pass --root PATH, or put the data there)")
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir():
        layout, parents = "train-test", [("train", train_dir)] + ([("test", test_dir)] if test_dir.is_dir() else [])
    else:
        layout, parents = "class-folders", [(None, root)]
    found: list[FoundFile] = []
    per_class: dict[str, int] = defaultdict(int)
    for split, parent in parents:
        for folder in _class_folders(parent, spec.ignore_folders):
            files = _files_under(folder)
            per_class[folder.name] += len(files)
            found.extend(FoundFile(path, folder.name, split) for path in files)
    if not per_class:
        raise DatasetError(f"dataset {spec.name!r}: no class folders under {root}")
    return layout, found, dict(per_class)


def match_classes(spec: DatasetSpec, folders: list[str]) -> tuple[DatasetSpec, dict[str, str]]:
    """Map folder names to class names. Registered datasets must find their classes; ad-hoc ones take the folders."""
    if not spec.classes:
        names: dict[str, str] = {}
        for folder in sorted(folders):
            names.setdefault(normalise_class_name(folder), folder)
        classes = tuple(ClassSpec(name, generic_prompts(name, spec.modality), (folder,)) for name, folder in names.items())
        spec = spec.with_classes(classes)
    mapping: dict[str, str] = {}
    for folder in folders:
        matches = [c.name for c in spec.classes if c.matches(folder)]
        if not matches:
            raise DatasetError(
                f"dataset {spec.name!r}: folder {folder!r} matches none of its classes {spec.class_names}; "
                "rename it, remove it, or declare the dataset under custom_datasets in params.yaml (ignore_folders: folders that hold no class)"
            )
        mapping[folder] = matches[0]
    return spec, mapping


# ---------------------------------------------------------------------------------------------------- decoding
def _source_mode(path: Path) -> str:
    if is_dicom(path):
        return "DICOM"
    with Image.open(path) as image:
        return image.mode


def inspect_files(found: list[FoundFile], progress: bool = False) -> tuple[list[ImageRecord], list[dict]]:
    """Decode every file; return (readable files with hash, size, mode and signature, unreadable ones with the reason)."""
    from tqdm import tqdm

    readable, corrupt = [], []
    for item in tqdm(found, desc="decode", unit="img", disable=not progress):
        try:
            image = load_image(item.path)
            readable.append(ImageRecord(item, file_sha256(item.path), image.shape[1], image.shape[0], _source_mode(item.path),
                                        image_signature(image)))
        except (ImageDecodeError, OSError) as error:
            corrupt.append({"path": str(item.path), "reason": str(error)})
    return readable, corrupt


# ---------------------------------------------------------------------------------------------------- dedup, leakage
def collapse_duplicates(readable: list[ImageRecord], mapping: dict[str, str]) -> tuple[list[ImageRecord], dict]:
    """One record per content hash. Conflicting labels drop the image; train copies of a test image are leakage."""
    groups: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in readable:
        groups[record.hash].append(record)
    kept, duplicate_groups, leaked, conflicts = [], [], [], []
    for digest, records in groups.items():
        labels = {mapping[r.file.folder] for r in records}
        paths = [str(r.file.path) for r in records]
        if len(labels) > 1:
            conflicts.append({"hash": digest, "labels": sorted(labels), "paths": paths})
            continue
        splits = {r.file.split for r in records}
        if "test" in splits and "train" in splits:
            leaked.append({"hash": digest, "kept_in": "test", "removed_from_train": [str(r.file.path) for r in records if r.file.split == "train"]})
            records = [r for r in records if r.file.split == "test"]
        if len(paths) > 1:
            duplicate_groups.append({"hash": digest, "paths": paths})
        kept.append(records[0])
    report = {
        "duplicate_groups": len(duplicate_groups),
        "duplicate_files_removed": sum(len(g["paths"]) - 1 for g in duplicate_groups),
        "duplicates": duplicate_groups,
        "leaked_train_test": len(leaked),
        "leaks": leaked,
        "conflicting_labels": conflicts,
    }
    return kept, report


def _connected_groups(size: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components of the graph whose edges are ``pairs``, singletons left out, each sorted."""
    parent = list(range(size))

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in pairs:
        parent[root(a)] = root(b)
    members: dict[int, list[int]] = defaultdict(list)
    for node in sorted({n for pair in pairs for n in pair}):
        members[root(node)].append(node)
    return sorted(members.values())


def find_near_duplicates(records: list[ImageRecord], mapping: dict[str, str], hash_threshold: int | None,
                         min_correlation: float) -> tuple[list[ImageRecord], dict]:
    """Drop near-copies (resized, re-encoded, brighter or darker versions of one image) from the training side.

    Two images are near-copies when their 64-bit perceptual hashes differ in at most ``hash_threshold`` bits and their
    32x32 structure maps correlate at least ``min_correlation``; near-copies are grouped transitively. Per group:

    - test images are always kept: a perceptual match is a judgement, and the evaluation set must stay the dataset's;
    - a group with a test image loses all its train images (leakage, like a byte-identical copy in both splits);
    - a train-only group with more than one label loses all its images: which label is right cannot be told;
    - a train-only group with one label keeps its first image by path, like byte-identical duplicates.

    Images without a split count as train: prepare runs this before it makes its split, so near-copies are collapsed
    first and the random split cannot put two copies of one image on both sides.
    Returns the kept records (in their input order) and the report for prepare.json.
    """
    report: dict = {"near_duplicate_pairs": 0, "near_duplicate_groups": 0, "near_duplicate_files_removed": 0,
                    "near_duplicate_leaks": 0, "near_duplicate_label_conflicts": 0,
                    "near_duplicates": {"groups": [], "pairs": []}}
    if hash_threshold is None or len(records) < 2:
        return list(records), report
    ordered = sorted(records, key=lambda r: str(r.file.path))
    hashes = np.array([r.signature.phash for r in ordered], dtype=np.uint64)
    candidates = hamming_pairs(hashes, hash_threshold)
    if not candidates:
        return list(records), report
    first, second, distance = (np.array(column) for column in zip(*candidates))
    structures = np.stack([r.signature.structure for r in ordered])
    correlation = np.einsum("ij,ij->i", structures[first], structures[second])
    verified = np.nonzero(correlation >= min_correlation)[0]
    pairs = [(int(first[k]), int(second[k]), int(distance[k]), float(correlation[k])) for k in verified]

    def label(index: int) -> str:
        return mapping[ordered[index].file.folder]

    def split(index: int) -> str:
        return ordered[index].file.split or "train"

    def path(index: int) -> str:
        return str(ordered[index].file.path)

    removed: set[int] = set()
    group_of: dict[int, int] = {}
    for number, members in enumerate(_connected_groups(len(ordered), [(a, b) for a, b, _, _ in pairs])):
        labels = sorted({label(i) for i in members})
        train = [i for i in members if split(i) == "train"]
        has_test = len(train) < len(members)
        if has_test:
            dropped, action = train, "train images removed: near-copies of a test image (test kept)"
        elif len(labels) > 1:
            dropped, action = train, f"all removed: one image filed under {labels}, the right label is unknown"
        else:
            dropped, action = train[1:], "first image by path kept, the other near-copies removed"
        if len(labels) > 1 and has_test:
            action += f"; label conflict {labels}: the test image keeps its label"
        kind = "label_conflict" if len(labels) > 1 else ("train_test_leak" if has_test and train else "duplicate")
        removed.update(dropped)
        report["near_duplicate_leaks"] += len(dropped) if has_test else 0
        report["near_duplicate_label_conflicts"] += kind == "label_conflict"
        report["near_duplicates"]["groups"].append({
            "group": number, "kind": kind, "action": action,
            "paths": [path(i) for i in members], "labels": [label(i) for i in members], "splits": [split(i) for i in members],
            "kept": [path(i) for i in members if i not in dropped], "removed": [path(i) for i in dropped],
        })
        group_of.update(dict.fromkeys(members, number))
    for a, b, bits, corr in pairs:
        kind = "label_conflict" if label(a) != label(b) else ("train_test_leak" if split(a) != split(b) else "duplicate")
        report["near_duplicates"]["pairs"].append({
            "paths": [path(a), path(b)], "labels": [label(a), label(b)], "splits": [split(a), split(b)],
            "hash_distance": bits, "correlation": round(corr, 4), "group": group_of[a], "kind": kind,
            "removed": [path(i) for i in (a, b) if i in removed],
        })
    report["near_duplicate_pairs"] = len(pairs)
    report["near_duplicate_groups"] = len(report["near_duplicates"]["groups"])
    report["near_duplicate_files_removed"] = len(removed)
    removed_paths = {ordered[i].file.path for i in removed}
    return [r for r in records if r.file.path not in removed_paths], report


# ---------------------------------------------------------------------------------------------------- splits
def stratified_test_split(labels_by_hash: dict[str, str], fraction: float, seed: int) -> tuple[dict[str, str], list[str]]:
    """Assign each hash to train or test, per class, seeded. Classes with < 2 images stay in train (with a warning)."""
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"test fraction must be in (0, 1), got {fraction}")
    by_class: dict[str, list[str]] = defaultdict(list)
    for digest, label in labels_by_hash.items():
        by_class[label].append(digest)
    split, warnings = {}, []
    for class_index, label in enumerate(sorted(by_class)):
        hashes = sorted(by_class[label])
        order = np.random.default_rng([seed, class_index]).permutation(len(hashes))
        if len(hashes) < 2:
            warnings.append(f"class {label!r} has {len(hashes)} image(s): it cannot be split, so it has no test image")
            n_test = 0
        else:
            n_test = min(max(1, round(fraction * len(hashes))), len(hashes) - 1)
        for rank, position in enumerate(order):
            split[hashes[position]] = "test" if rank < n_test else "train"
    return split, warnings


def subset_size(n_class: int, fraction: float | None = None, shots: int | None = None) -> int:
    if shots is not None:
        return min(shots, n_class)
    assert fraction is not None
    return min(n_class, max(1, round(fraction * n_class)))


def training_subsets(train: list[Entry], fractions: list[float], shots: list[int], seeds: list[int]) -> dict:
    """Nested, stratified training subsets: for one seed each class is shuffled once and every subset is a prefix."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for entry in sorted(train, key=lambda e: e.hash):
        by_class[entry.label].append(entry.hash)
    subsets: dict = {"fraction": {}, "shots": {}}
    for seed in seeds:
        orders = {label: [hashes[i] for i in np.random.default_rng([seed, ci, 7]).permutation(len(hashes))]
                  for ci, (label, hashes) in enumerate(sorted(by_class.items()))}
        for fraction in fractions:
            chosen = [h for label, order in orders.items() for h in order[: subset_size(len(order), fraction=fraction)]]
            subsets["fraction"].setdefault(f"{fraction:g}", {})[str(seed)] = sorted(chosen)
        for k in shots:
            chosen = [h for label, order in orders.items() for h in order[: subset_size(len(order), shots=k)]]
            subsets["shots"].setdefault(str(k), {})[str(seed)] = sorted(chosen)
    return subsets


# ---------------------------------------------------------------------------------------------------- files
def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json(path: Path, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_manifest(path: Path, entries: list[Entry]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        writer.writerow(asdict(entry))
    write_atomic(path, buffer.getvalue())


def read_manifest(path: Path) -> list[Entry]:
    if not path.exists():
        raise DatasetError(f"no manifest at {path}: run `medfocus prepare` for this dataset first")
    with path.open(newline="") as handle:
        return [Entry(r["hash"], r["path"], r["label"], r["split"], int(r["width"]), int(r["height"]), r["mode"]) for r in csv.DictReader(handle)]
