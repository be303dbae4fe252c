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
import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import ClassSpec, DatasetSpec, generic_prompts, normalise_class_name
from .images import (
    SIGNATURE_SIDE,
    ImageDecodeError,
    ImageSignature,
    file_sha256,
    hamming_pairs,
    image_signature,
    is_dicom,
    load_image,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
MANIFEST_COLUMNS = ("hash", "path", "label", "split", "width", "height", "mode")


class DatasetError(ValueError):
    """The dataset cannot be used as it is; the message says what to change."""


class SingleClassError(DatasetError):
    """A dataset with one class: nothing to tell apart, so nothing to train or evaluate."""


def require_two_classes(dataset: str, class_names: list[str]) -> None:
    """Training and evaluation need at least two classes: raise :class:`SingleClassError` naming the dataset."""
    if len(class_names) < 2:
        raise SingleClassError(
            f"dataset {dataset!r} has {'one class, ' + repr(class_names[0]) if class_names else 'no class'}: a classifier "
            "needs at least two. Add a folder (or CSV label) per class and run `medfocus prepare` again"
        )


@dataclass(frozen=True)
class FoundFile:
    path: Path
    folder: str  # the class as the folder or CSV names it
    split: str | None
    source: str = ""  # where it was listed, when not a folder: "labels.csv:7"


@dataclass(frozen=True)
class ImageRecord:
    """A file that decoded: its content hash, size, source mode and perceptual signature."""

    file: FoundFile
    hash: str
    width: int
    height: int
    mode: str
    signature: ImageSignature
    identity: str = ""  # file_identity() when it was read: a later prepare reuses the record while it still holds


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
    """The CSV's rows as files, relative paths taken from the CSV's folder. Rows whose file is missing stay listed (prepare
    reports them as skipped, see :func:`split_missing`); rows that point outside the CSV's folder are read, with a warning."""
    found: list[FoundFile] = []
    folder = Path(os.path.abspath(csv_path.parent))
    outside: list[tuple[int, str]] = []
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark is no header
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
            listed = (row.get("path") or "").strip()
            if not listed:
                raise DatasetError(f"{csv_path}:{line}: empty path")
            path = csv_path.parent / listed
            if not Path(os.path.normpath(folder / listed)).is_relative_to(folder):
                outside.append((line, listed))
            found.append(FoundFile(path, label, split, f"{csv_path.name}:{line}"))
    if outside:
        line, listed = outside[0]
        log.warning("%s: %d row(s) name files outside the CSV's folder %s (e.g. line %d: %s); they are read as listed",
                    csv_path, len(outside), folder, line, listed)
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
    """Map folder names to class names. Registered datasets must find their classes; ad-hoc ones take the folders.

    Each folder keeps its own name as an ad-hoc class name, Unicode intact. Folders are matched to a defined class's
    name or listed ``folders`` ignoring case, spaces and punctuation; two folders that would be one class through one
    such name ('Benign' and 'benign', composed and decomposed 'Tumör') are an error naming both, never merged
    silently. A class that lists several ``folders`` takes one folder per listed name: that mapping is deliberate.
    """
    folders = sorted(dict.fromkeys(folders))
    if not spec.classes:
        by_key: dict[str, list[str]] = defaultdict(list)
        for folder in folders:
            by_key[normalise_class_name(folder)].append(folder)
        _refuse_merged_folders(spec, [(names, names[0]) for names in by_key.values()])
        classes = tuple(ClassSpec(folder, generic_prompts(folder, spec.modality), (folder,)) for folder in folders)
        spec = spec.with_classes(classes)
    mapping: dict[str, str] = {}
    by_name: dict[tuple[str, str], list[str]] = defaultdict(list)
    for folder in folders:
        matches = [(c.name, c.matching_name(folder)) for c in spec.classes if c.matches(folder)]
        if not matches:
            raise DatasetError(
                f"dataset {spec.name!r}: folder {folder!r} matches none of its classes {spec.class_names}; "
                "rename it, remove it, or declare the dataset under custom_datasets in params.yaml (ignore_folders: folders that hold no class)"
            )
        mapping[folder] = matches[0][0]
        by_name[matches[0]].append(folder)
    _refuse_merged_folders(spec, [(names, class_name) for (class_name, _), names in by_name.items()])
    return spec, mapping


def _refuse_merged_folders(spec: DatasetSpec, groups: list[tuple[list[str], str]]) -> None:
    clashes = [(names, class_name) for names, class_name in groups if len(names) > 1]
    if clashes:
        described = "; ".join(f"{' and '.join(map(repr, names))} would both be class {class_name!r}" for names, class_name in clashes)
        raise DatasetError(
            f"dataset {spec.name!r}: class folders that differ only in case, spaces, punctuation or Unicode form: {described}. "
            "Merge them into one folder or rename one (or map them deliberately with `folders` under custom_datasets in params.yaml)"
        )


def split_missing(found: list[FoundFile]) -> tuple[list[FoundFile], list[dict]]:
    """(files that exist, skipped ones as ``{"path", "reason"}``): a CSV row naming a file that is not there is reported
    and skipped like a corrupt file, never an error that stops prepare."""
    present, missing = [], []
    for item in found:
        if item.path.is_file():
            present.append(item)
        else:
            what = "not a file" if item.path.exists() else "no such file"
            where = f"{item.source}: " if item.source else ""
            missing.append({"path": str(item.path), "reason": f"{where}{what}: {item.path}"})
    return present, missing


# ---------------------------------------------------------------------------------------------------- decoding
def _source_mode(path: Path) -> str:
    if is_dicom(path):
        return "DICOM"
    with Image.open(path) as image:
        return image.mode


def file_identity(path: Path) -> str:
    """What tells one version of a file from another without reading it: its path, size, modification time, device,
    inode and status-change time. Rewriting a file changes its ctime even when its size stays and its mtime is set back
    (``touch -d``, ``os.utime``, copies that keep times); replacing it changes the inode. The path is resolved, so one
    folder reached from another working directory (``../data`` from two checkouts) is the same listing."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_dev}|{stat.st_ino}|{stat.st_ctime_ns}"


def inspect_files(found: list[FoundFile], progress: bool = False,
                  known: dict[str, ImageRecord] | None = None) -> tuple[list[ImageRecord], list[dict]]:
    """Decode every file; return (readable files with hash, size, mode and signature, unreadable ones with the reason).

    ``known`` (from :func:`load_known_records`) maps file identities to records of an earlier prepare: a file whose
    identity is there is not read again. Pass none to decode and hash every file (``medfocus prepare --rehash``).
    """
    from tqdm import tqdm

    readable, corrupt = [], []
    for item in tqdm(found, desc="decode", unit="img", disable=not progress):
        try:
            identity = file_identity(item.path)
            record = (known or {}).get(identity)
            if record is not None:
                readable.append(replace(record, file=item))
                continue
            image = load_image(item.path)
            readable.append(ImageRecord(item, file_sha256(item.path), image.shape[1], image.shape[0], _source_mode(item.path),
                                        image_signature(image), identity))
        except (ImageDecodeError, OSError) as error:
            corrupt.append({"path": str(item.path), "reason": str(error)})
    return readable, corrupt


def _decoder_version() -> str:
    """What a decoded record depends on besides the file: the decoding code and the libraries it calls."""
    import PIL
    import pydicom

    digest = hashlib.sha256()
    for module in (Path(__file__).with_name("images.py"), Path(__file__)):
        digest.update(module.read_bytes())
    digest.update(f"{PIL.__version__}|{pydicom.__version__}|{np.__version__}".encode())
    return digest.hexdigest()[:16]


def load_known_records(path: Path) -> dict[str, ImageRecord]:
    """The records :func:`save_known_records` kept, by file identity; none when the file is absent, unreadable or was
    written by other decoding code or library versions."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["version"]) != _decoder_version():
                return {}
            columns = {name: data[name] for name in ("identity", "hash", "width", "height", "mode", "phash", "structure")}
    except (OSError, KeyError, ValueError):
        return {}
    placeholder = FoundFile(Path(), "", None)
    return {str(identity): ImageRecord(placeholder, str(digest), int(width), int(height), str(mode),
                                       ImageSignature(int(phash), structure), str(identity))
            for identity, digest, width, height, mode, phash, structure in zip(*columns.values())}


def save_known_records(path: Path, records: list[ImageRecord]) -> None:
    """Keep the decoded records of this prepare (hash, size, mode, signature per file identity) for the next one."""
    records = [r for r in records if r.identity]
    side = SIGNATURE_SIDE * SIGNATURE_SIDE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("wb") as handle:
        np.savez(handle, version=np.array(_decoder_version()),
                 identity=np.array([r.identity for r in records], dtype=str),
                 hash=np.array([r.hash for r in records], dtype=str),
                 width=np.array([r.width for r in records], dtype=np.int64),
                 height=np.array([r.height for r in records], dtype=np.int64),
                 mode=np.array([r.mode for r in records], dtype=str),
                 phash=np.array([r.signature.phash for r in records], dtype=np.uint64),
                 structure=np.stack([r.signature.structure for r in records]) if records else np.zeros((0, side), np.float32))
    os.replace(temporary, path)


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
            duplicate_groups.append({"hash": digest, "paths": paths, "kept": str(records[0].file.path)})
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
def hash_draw(purpose: str, seed: int, digest: str) -> float:
    """A number in [0, 1) fixed by an image's content hash, a seed and what it decides (see :func:`stratified_test_split`)."""
    value = hashlib.sha256(f"medfocus|{purpose}|{seed}|{digest}".encode()).digest()
    return int.from_bytes(value[:8], "big") / 2.0**64


def _by_draw(hashes: list[str], purpose: str, seed: int) -> list[str]:
    return sorted(hashes, key=lambda digest: (hash_draw(purpose, seed, digest), digest))


def stratified_test_split(labels_by_hash: dict[str, str], fraction: float, seed: int) -> tuple[dict[str, str], list[str]]:
    """Assign each hash to train or test, per class. The split rule, and the rule of the training subsets:

    Each image draws a number in [0, 1) from the sha256 of its content hash and the seed (``hash_draw``). An image is a
    test image when its draw is below the test fraction, so its split depends on its own content alone: adding,
    removing or changing other images never moves it between train and test. Only where that leaves a class with no
    test image (or with no training image) does the class's lowest draw go to test (its highest to train); a class
    with one image stays in train, with a warning. A dataset with its own train/test folders (or CSV split column)
    keeps them. Training subsets rank each class's training images by another draw (from the subset seed): a
    fraction f takes the first max(1, round(f·n)) of them, a k-shot subset the first k, so subsets are stratified,
    nested (5 % ⊂ 10 % ⊂ …, 1 ⊂ 2 ⊂ 4 shots) and an added or removed image changes at most the one image at the
    edge of a subset besides itself.
    """
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"test fraction must be in (0, 1), got {fraction}")
    by_class: dict[str, list[str]] = defaultdict(list)
    for digest, label in labels_by_hash.items():
        by_class[label].append(digest)
    split, warnings = {}, []
    for label in sorted(by_class):
        ranked = _by_draw(by_class[label], "test-split", seed)
        if len(ranked) < 2:
            warnings.append(f"class {label!r} has {len(ranked)} image(s): it cannot be split, so it has no test image")
            test = set()
        else:
            test = {digest for digest in ranked if hash_draw("test-split", seed, digest) < fraction}
            if not test:
                test = {ranked[0]}
            elif len(test) == len(ranked):
                test.discard(ranked[-1])
        for digest in ranked:
            split[digest] = "test" if digest in test else "train"
    return split, warnings


def subset_size(n_class: int, fraction: float | None = None, shots: int | None = None) -> int:
    if shots is not None:
        return min(shots, n_class)
    assert fraction is not None
    return min(n_class, max(1, round(fraction * n_class)))


def training_subsets(train: list[Entry], fractions: list[float], shots: list[int], seeds: list[int]) -> dict:
    """Nested, stratified training subsets: for one seed each class is ranked by its images' hash draws once and every
    subset is a prefix of that ranking (the rule: :func:`stratified_test_split`)."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for entry in train:
        by_class[entry.label].append(entry.hash)
    subsets: dict = {"fraction": {}, "shots": {}}
    for seed in seeds:
        orders = {label: _by_draw(hashes, "subset", seed) for label, hashes in sorted(by_class.items())}
        for fraction in fractions:
            chosen = [h for label, order in orders.items() for h in order[: subset_size(len(order), fraction=fraction)]]
            subsets["fraction"].setdefault(f"{fraction:g}", {})[str(seed)] = sorted(chosen)
        for k in shots:
            chosen = [h for label, order in orders.items() for h in order[: subset_size(len(order), shots=k)]]
            subsets["shots"].setdefault(str(k), {})[str(seed)] = sorted(chosen)
    return subsets


# ---------------------------------------------------------------------------------------------------- summary
DROPPED_EXAMPLES = 5


def dropped_images(summary: dict, examples: int = DROPPED_EXAMPLES) -> dict[str, dict]:
    """Every file prepare left out, per reason: ``{reason: {"count": n, "examples": [up to `examples` paths]}}``, only
    reasons that dropped something. Reasons: corrupt, missing (CSV rows), duplicate (byte-identical copies beyond the
    one kept), train_test_leak (train copies of a test image), label_conflict (one content under several labels: all
    copies), and near_duplicate, near_duplicate_leak, near_duplicate_label_conflict (see :func:`find_near_duplicates`)."""
    leaked = {path for leak in summary.get("leaks", []) for path in leak["removed_from_train"]}
    by_reason: dict[str, list[str]] = {
        "corrupt": [item["path"] for item in summary.get("corrupt", [])],
        "missing": [item["path"] for item in summary.get("missing", [])],
        "duplicate": [path for group in summary.get("duplicates", [])
                      for path in group["paths"] if path != group.get("kept", group["paths"][0]) and path not in leaked],
        "train_test_leak": [path for leak in summary.get("leaks", []) for path in leak["removed_from_train"]],
        "label_conflict": [path for conflict in summary.get("conflicting_labels", []) for path in conflict["paths"]],
    }
    near_kinds = {"duplicate": "near_duplicate", "train_test_leak": "near_duplicate_leak", "label_conflict": "near_duplicate_label_conflict"}
    for group in (summary.get("near_duplicates") or {}).get("groups", []):
        by_reason.setdefault(near_kinds.get(group["kind"], "near_duplicate"), []).extend(group["removed"])
    return {reason: {"count": len(paths), "examples": paths[:examples]} for reason, paths in by_reason.items() if paths}


# ---------------------------------------------------------------------------------------------------- files
def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
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
    with path.open(newline="", encoding="utf-8") as handle:
        return [Entry(r["hash"], r["path"], r["label"], r["split"], int(r["width"]), int(r["height"]), r["mode"]) for r in csv.DictReader(handle)]
