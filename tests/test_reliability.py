"""Issue 26, nothing silently wrong: class folders kept apart, splits that adding or removing an image leaves alone,
workers that never outlive their run, CSV rows that name missing or outside files, one-class datasets, and every
dropped image in prepare's printed summary."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import os
import signal
import subprocess
import sys
import textwrap
import time
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfocus.pipeline.config import parse_params
from medfocus.pipeline.datasets import class_file_key, resolve_dataset
from medfocus.pipeline.images import file_sha256
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.preparation import load_prepared, prepare_dataset
from medfocus.stages.cli import app
from medfocus.pipeline.manifest import (
    DatasetError,
    Entry,
    SingleClassError,
    discover,
    dropped_images,
    match_classes,
    read_manifest,
    split_missing,
    stratified_test_split,
    training_subsets,
)

from .conftest import write_image


# ---------------------------------------------------------------------------------------------------- class folders
def _classes(root: Path, name: str = "adhoc"):
    spec = resolve_dataset(name, root)
    _, found, per_folder = discover(spec)
    spec, mapping = match_classes(spec, sorted(per_folder))
    return spec, mapping, Counter(mapping[f.folder] for f in found)


def test_unicode_class_folders_stay_apart_with_their_real_names(tmp_path):
    root = tmp_path / "data"
    for n, folder in enumerate(("Tumör", "Tumør", "tumor")):
        for i in range(3):
            write_image(root / folder / f"{i}.png", seed=10 * n + i)
    spec, mapping, counts = _classes(root)
    assert counts == {"Tumör": 3, "Tumør": 3, "tumor": 3}
    assert set(spec.class_names) == {"Tumör", "Tumør", "tumor"}
    assert mapping == {"Tumör": "Tumör", "Tumør": "Tumør", "tumor": "tumor"}
    prompts = {c.name: c.prompts for c in spec.classes}
    assert any("Tumör" in prompt for prompt in prompts["Tumör"])  # prompts use the real name
    # Where a file name needs one, an ASCII key that still tells the classes apart.
    keys = {class_file_key(name) for name in spec.class_names}
    assert len(keys) == 3 and all(key.isascii() and "/" not in key for key in keys)
    assert class_file_key("glioma_tumor") == "glioma_tumor"


@pytest.mark.parametrize("folders", [("Benign", "benign"), ("Viral Pneumonia", "viral_pneumonia"),
                                     (unicodedata.normalize("NFC", "Tumör"), unicodedata.normalize("NFD", "Tumör"))])
def test_folders_that_would_merge_are_an_error_naming_both(tmp_path, folders):
    root = tmp_path / "data"
    for n, folder in enumerate(folders):
        write_image(root / folder / "a.png", seed=n)
        write_image(root / folder / "b.png", seed=n + 10)
    write_image(root / "other" / "c.png", seed=99)
    with pytest.raises(DatasetError) as error:
        _classes(root)
    assert all(repr(folder) in str(error.value) or folder in str(error.value) for folder in folders)


def test_registered_classes_keep_their_names_and_deliberate_folder_lists(tmp_path):
    covid = tmp_path / "covid"
    for folder in ("Covid", "Normal", "Viral Pneumonia"):
        write_image(covid / "train" / folder / "a.png", seed=len(folder))
    spec, mapping, _ = _classes(covid, "covid")
    assert mapping == {"Covid": "covid", "Normal": "normal", "Viral Pneumonia": "viral_pneumonia"}
    assert spec.class_names == ["covid", "normal", "viral_pneumonia"]

    lung = tmp_path / "lung"
    for folder in ("COVID-19", "Corona Virus Disease", "Normal"):
        write_image(lung / folder / "a.png", seed=len(folder))
    _, mapping, counts = _classes(lung, "lung_disease")
    assert mapping == {"COVID-19": "covid", "Corona Virus Disease": "covid", "Normal": "normal"}
    assert counts == {"covid": 2, "normal": 1}

    busi = tmp_path / "busi"
    for folder in ("Benign", "benign", "malignant", "normal"):
        write_image(busi / folder / "a.png", seed=len(folder) + folder.isupper())
    with pytest.raises(DatasetError, match="'Benign'.*'benign'|'benign'.*'Benign'"):
        _classes(busi, "breast_cancer")


def test_prepare_keeps_unicode_class_names_in_manifest_and_prompts(tmp_path):
    root = tmp_path / "data"
    for n, folder in enumerate(("Tumör", "Tumør", "tumor")):
        for i in range(4):
            write_image(root / folder / f"{i}.png", seed=10 * n + i)
    summary, paths = _prepare(root, tmp_path)
    assert {name: sum(summary["counts"][s].get(name, 0) for s in ("train", "test")) for name in ("Tumör", "Tumør", "tumor")} == \
        {"Tumör": 4, "Tumør": 4, "tumor": 4}
    assert {e.label for e in read_manifest(paths.manifest)} == {"Tumör", "Tumør", "tumor"}
    classes = {c["name"]: c["prompts"] for c in json.loads(paths.prepare_summary.read_text())["classes"]}
    assert "a medical image of Tumør" in classes["Tumør"]


# ---------------------------------------------------------------------------------------------------- stable splits
def _digest(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def _labels(sizes: dict[str, int], salt: str = "") -> dict[str, str]:
    return {_digest(salt, label, i): label for label, size in sizes.items() for i in range(size)}


def test_test_split_is_stratified_and_about_the_fraction():
    labels = _labels({"a": 200, "b": 60, "c": 2})
    split, warnings = stratified_test_split(labels, 0.2, seed=0)
    tests = Counter(labels[h] for h, s in split.items() if s == "test")
    assert 25 <= tests["a"] <= 55 and 4 <= tests["b"] <= 22 and tests["c"] == 1  # every class with 2 images: one each side
    assert warnings == []
    assert stratified_test_split(dict(reversed(list(labels.items()))), 0.2, seed=0)[0] == split  # no order dependence
    assert stratified_test_split(labels, 0.2, seed=1)[0] != split


def test_removing_or_adding_an_image_moves_no_other_image_across_the_split():
    labels = _labels({"a": 80, "b": 30, "c": 12})
    split, _ = stratified_test_split(labels, 0.25, seed=3)
    for removed in [h for h in labels if split[h] == "train"][:10] + [h for h in labels if split[h] == "test"][:5]:
        smaller = {h: l for h, l in labels.items() if h != removed}
        after, _ = stratified_test_split(smaller, 0.25, seed=3)
        assert after == {h: s for h, s in split.items() if h != removed}
    for n in range(10):
        added = _digest("new", n)
        for label in ("a", "b", "c"):
            after, _ = stratified_test_split({**labels, added: label}, 0.25, seed=3)
            assert {h: s for h, s in after.items() if h != added} == split


def _entries(labels: dict[str, str]) -> list[Entry]:
    return [Entry(h, f"{label}/{h[:8]}.png", label, "train", 8, 8, "RGB") for h, label in labels.items()]


FRACTIONS, SHOTS, SEEDS = [0.05, 0.1, 0.2, 0.5, 1.0], [1, 2, 4, 8, 16], [0, 1, 2, 3, 4]


def test_subsets_are_nested_stratified_and_stable_under_additions_and_removals():
    labels = _labels({"a": 120, "b": 40, "c": 9}, salt="train")
    subsets = training_subsets(_entries(labels), FRACTIONS, SHOTS, SEEDS)
    assert training_subsets(list(reversed(_entries(labels))), FRACTIONS, SHOTS, SEEDS) == subsets
    for seed in map(str, SEEDS):
        previous: set[str] = set()
        for fraction in map(lambda f: f"{f:g}", FRACTIONS):
            chosen = set(subsets["fraction"][fraction][seed])
            assert previous <= chosen and set(Counter(labels[h] for h in chosen)) == {"a", "b", "c"}
            previous = chosen
        assert Counter(labels[h] for h in subsets["fraction"]["0.5"][seed]) == {"a": 60, "b": 20, "c": 4}
        assert Counter(labels[h] for h in subsets["shots"]["4"][seed]) == {"a": 4, "b": 4, "c": 4}

    def changed(before: dict, after: dict, ignore: str) -> int:
        """The most images, other than ``ignore``, that entered or left one subset."""
        most = 0
        for kind in ("fraction", "shots"):
            for size, by_seed in before[kind].items():
                for seed, hashes in by_seed.items():
                    most = max(most, len((set(hashes) ^ set(after[kind][size][seed])) - {ignore}))
        return most

    for removed in list(labels)[::17]:
        after = training_subsets(_entries({h: l for h, l in labels.items() if h != removed}), FRACTIONS, SHOTS, SEEDS)
        assert changed(subsets, after, removed) <= 1  # at most the image at the edge of a subset, to keep its size
    for n in range(6):
        added = _digest("added", n)
        after = training_subsets(_entries({**labels, added: "b"}), FRACTIONS, SHOTS, SEEDS)
        assert changed(subsets, after, added) <= 1


def test_prepare_moves_no_image_across_the_split_when_one_is_removed_or_added(tmp_path):
    root = tmp_path / "data"
    for n, folder in enumerate(("a", "b")):
        for i in range(15):
            write_image(root / folder / f"{i}.png", seed=100 * n + i, size=16)
    _, paths = _prepare(root, tmp_path / "first")
    before = {e.hash: e.split for e in read_manifest(paths.manifest)}
    removed = next(e for e in read_manifest(paths.manifest) if e.split == "train")
    (root / removed.path).unlink()
    write_image(root / "b" / "new.png", seed=999, size=16)
    _, paths = _prepare(root, tmp_path / "second")
    after = {e.hash: e.split for e in read_manifest(paths.manifest)}
    new_hash = file_sha256(root / "b" / "new.png")
    assert set(after) == set(before) - {removed.hash} | {new_hash}
    assert {h: s for h, s in after.items() if h != new_hash} == {h: s for h, s in before.items() if h != removed.hash}


# ---------------------------------------------------------------------------------------------------- change detection
def _rewrite_keeping_size_and_mtime(path: Path) -> None:
    stat = path.stat()
    time.sleep(0.05)  # past the filesystem's timestamp granularity
    data = bytearray(path.read_bytes())
    data[-16:] = bytes(255 - b for b in data[-16:])  # other pixels, same size, written in place (same inode)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)


@pytest.fixture
def bmp_dataset(tmp_path) -> Path:
    """Uncompressed images: a change of pixels keeps the file's size."""
    root = tmp_path / "bmp"
    for n, folder in enumerate(("alpha", "beta")):
        for i in range(5):
            write_image(root / folder / f"{i}.bmp", seed=10 * n + i, size=16)
    return root


def test_a_rewritten_image_with_its_size_and_mtime_kept_is_noticed(bmp_dataset, tmp_path):
    spec, params = resolve_dataset("knee", bmp_dataset), parse_params({})
    paths = DatasetPaths("knee", tmp_path / "cache")
    prepare_dataset(spec, params, paths, progress=False)
    target = bmp_dataset / "alpha" / "1.bmp"
    old = file_sha256(target)
    _rewrite_keeping_size_and_mtime(target)
    new = file_sha256(target)
    assert new != old
    prepared = load_prepared(spec, params, paths, progress=False)  # what segment, features, ... read
    hashes = {e.path: e.hash for e in prepared.entries}
    assert hashes["alpha/1.bmp"] == new
    assert {e.path: e.hash for e in read_manifest(paths.manifest)}["alpha/1.bmp"] == new
    # prepare itself, which keeps the records of unchanged files, reads it again too
    target2 = bmp_dataset / "beta" / "2.bmp"
    _rewrite_keeping_size_and_mtime(target2)
    prepare_dataset(spec, params, paths, progress=False)
    assert {e.path: e.hash for e in read_manifest(paths.manifest)}["beta/2.bmp"] == file_sha256(target2)


def test_the_same_folder_from_another_working_directory_is_not_prepared_again(bmp_dataset, tmp_path, monkeypatch):
    # ../bmp from two checkouts (two working directories) names the same files: nothing to prepare again
    for checkout in ("one", "two"):
        (tmp_path / checkout).mkdir()
    spec_of = {}
    for checkout in ("one", "two"):
        monkeypatch.chdir(tmp_path / checkout)
        spec_of[checkout] = resolve_dataset("knee", Path("..") / "bmp")
    params, paths = parse_params({}), DatasetPaths("knee", tmp_path / "cache")
    monkeypatch.chdir(tmp_path / "one")
    prepare_dataset(spec_of["one"], params, paths, progress=False)
    recorded = paths.prepare_summary.stat().st_mtime_ns
    monkeypatch.chdir(tmp_path / "two")
    load_prepared(spec_of["two"], params, paths, progress=False)
    assert paths.prepare_summary.stat().st_mtime_ns == recorded  # not prepared again


def test_prepare_reads_only_changed_files_and_rehash_reads_every_one(bmp_dataset, tmp_path, monkeypatch):
    import medfocus.pipeline.manifest as manifest

    hashed: list[str] = []
    real = manifest.file_sha256
    monkeypatch.setattr(manifest, "file_sha256", lambda path: hashed.append(str(path)) or real(path))
    command = ["prepare", "--dataset", "knee", "--root", str(bmp_dataset), "--cache-dir", str(tmp_path / "cache"), "-q"]
    runner = CliRunner()
    assert runner.invoke(app, command).exit_code == 0 and len(hashed) == 10
    first = (tmp_path / "cache" / "knee" / "manifest.csv").read_text()
    hashed.clear()
    write_image(bmp_dataset / "beta" / "new.bmp", seed=77, size=16)
    assert runner.invoke(app, command).exit_code == 0
    assert [Path(p).name for p in hashed] == ["new.bmp"]
    hashed.clear()
    (bmp_dataset / "beta" / "new.bmp").unlink()
    result = runner.invoke(app, command + ["--rehash"])
    assert result.exit_code == 0, result.output
    assert len(hashed) == 10
    assert (tmp_path / "cache" / "knee" / "manifest.csv").read_text() == first


# ---------------------------------------------------------------------------------------------------- CSV inputs
def test_csv_rows_with_missing_files_are_reported_skips_and_outside_paths_warn(tmp_path, caplog):
    folder = tmp_path / "csvdata"
    outside = write_image(tmp_path / "elsewhere" / "x.png", seed=5)
    lines = ["path,label"]
    for i in range(4):
        write_image(folder / "imgs" / f"{i}.png", seed=i)
        lines.append(f"imgs/{i}.png,{'cat' if i % 2 else 'dog'}")
    lines += ["imgs/gone.png,cat", "../elsewhere/x.png,dog", f"{outside},cat"]
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="medfocus.pipeline.manifest"):
        _, found, _ = discover(resolve_dataset("pets", folder / "labels.csv"))
    assert "2 row(s)" in caplog.text and "outside" in caplog.text and "x.png" in caplog.text
    present, missing = split_missing(found)
    assert len(present) == 6
    [skip] = missing
    assert skip["path"].endswith("imgs/gone.png") and "labels.csv:6" in skip["reason"] and "no such file" in skip["reason"]


def test_prepare_skips_and_reports_a_csv_row_whose_file_is_missing(tmp_path):
    folder = tmp_path / "csvdata"
    lines = ["path,label"]
    for i in range(6):
        write_image(folder / "imgs" / f"{i}.png", seed=i)
        lines.append(f"imgs/{i}.png,{'cat' if i % 2 else 'dog'}")
    lines.append("imgs/gone.png,cat")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["prepare", "--dataset", "pets", "--root", str(folder / "labels.csv"),
                                      "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cache" / "pets" / "prepare.json").read_text())
    assert summary["images"] == 6 and summary["missing_count"] == 1
    assert "labels.csv:8" in summary["missing"][0]["reason"]
    printed = json.loads(result.stdout)
    assert printed["dropped"]["missing"] == {"count": 1, "examples": [summary["missing"][0]["path"]]}
    # the later stages' check of the listing copes with the missing row too
    spec = resolve_dataset("pets", folder / "labels.csv")
    prepared = load_prepared(spec, parse_params({}), DatasetPaths("pets", tmp_path / "cache"), progress=False)
    assert len(prepared.entries) == 6 and any("missing" in item["reason"] for item in prepared.unreadable())


# ---------------------------------------------------------------------------------------------------- single class
def test_one_class_warns_in_prepare_and_train_evaluate_refuse_it(tmp_path):
    root = tmp_path / "solo"
    for i in range(5):
        write_image(root / "tumor" / f"{i}.png", seed=i)
    summary, _ = _prepare(root, tmp_path, name="solo")
    assert any("one class" in w and "solo" in w for w in summary["warnings"])
    for command in ("train", "evaluate"):
        result = CliRunner().invoke(app, [command, "--dataset", "solo", "--root", str(root), "--cache-dir", str(tmp_path / "cache")])
        assert result.exit_code == 2, result.output
        assert "'solo'" in result.output and "one class" in result.output and "Traceback" not in result.output
    with pytest.raises(SingleClassError):
        load_prepared(resolve_dataset("solo", root), parse_params({}), DatasetPaths("solo", tmp_path / "cache"),
                      progress=False).require_two_classes()


# ---------------------------------------------------------------------------------------------------- printed summary
def test_prepare_prints_every_dropped_image_per_reason(tmp_path):
    root = tmp_path / "data"
    for n, folder in enumerate(("alpha", "beta")):
        for i in range(5):
            write_image(root / folder / f"{i}.png", seed=10 * n + i)
    shutil.copy(root / "alpha" / "0.png", root / "beta" / "filed_twice.png")  # one content, two classes
    shutil.copy(root / "beta" / "1.png", root / "beta" / "copy.png")  # byte duplicate
    (root / "beta" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = CliRunner().invoke(app, ["prepare", "--dataset", "adhoc", "--root", str(root), "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert result.exit_code == 0, result.output
    dropped = json.loads(result.stdout)["dropped"]
    assert dropped["label_conflict"]["count"] == 2
    assert {Path(p).name for p in dropped["label_conflict"]["examples"]} == {"0.png", "filed_twice.png"}
    assert dropped["duplicate"]["count"] == 1 and Path(dropped["duplicate"]["examples"][0]).name in {"1.png", "copy.png"}
    assert dropped["corrupt"] == {"count": 1, "examples": [str(root / "beta" / "broken.png")]}


def _prepare(root: Path, tmp_path: Path, name: str = "adhoc", **prepare_params):
    params = parse_params({"prepare": prepare_params} if prepare_params else {})
    paths = DatasetPaths(name, tmp_path / "cache")
    return prepare_dataset(resolve_dataset(name, root, params), params, paths, progress=False), paths


# ---------------------------------------------------------------------------------------------------- dropped images
def test_dropped_images_are_counted_per_reason_with_examples():
    summary = {
        "corrupt": [{"path": f"a/broken{i}.png", "reason": "cannot decode"} for i in range(7)],
        "missing": [{"path": "a/gone.png", "reason": "labels.csv:3: no such file"}],
        "duplicates": [{"hash": "h", "paths": ["a/1.png", "a/1 copy.png", "a/1 copy 2.png"]}],
        "leaks": [{"hash": "k", "kept_in": "test", "removed_from_train": ["train/a/leak.png"]}],
        "conflicting_labels": [{"hash": "c", "labels": ["a", "b"], "paths": ["a/x.png", "b/x.png"]}],
        "near_duplicates": {"groups": [
            {"kind": "duplicate", "removed": ["a/n1.png"], "kept": ["a/n0.png"]},
            {"kind": "train_test_leak", "removed": ["train/a/n2.png"], "kept": ["test/a/n2.png"]},
            {"kind": "label_conflict", "removed": ["a/n3.png", "b/n3.png"], "kept": []},
        ]},
    }
    dropped = dropped_images(summary)
    assert dropped["corrupt"] == {"count": 7, "examples": [f"a/broken{i}.png" for i in range(5)]}
    assert dropped["missing"]["count"] == 1
    assert dropped["duplicate"] == {"count": 2, "examples": ["a/1 copy.png", "a/1 copy 2.png"]}
    assert dropped["train_test_leak"] == {"count": 1, "examples": ["train/a/leak.png"]}
    assert dropped["label_conflict"] == {"count": 2, "examples": ["a/x.png", "b/x.png"]}
    assert dropped["near_duplicate"] == {"count": 1, "examples": ["a/n1.png"]}
    assert dropped["near_duplicate_leak"] == {"count": 1, "examples": ["train/a/n2.png"]}
    assert dropped["near_duplicate_label_conflict"] == {"count": 2, "examples": ["a/n3.png", "b/n3.png"]}
    assert dropped_images({"corrupt": []}) == {}


# ---------------------------------------------------------------------------------------------------- orphaned workers
WORKER_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from tqdm import tqdm
    from medfocus.pipeline.runner import parse_scheduler, run_tasks

    def sleeper(task, context):
        Path(context["dir"], f"{os.getpid()}.pid").write_text(str(task))
        time.sleep(300)
        return [task]

    if __name__ == "__main__":
        # As from a terminal: started in the background by a non-interactive shell (`cmd &`, nohup, some CI runners)
        # a process inherits SIGINT ignored, and the runner rightly leaves an ignored signal alone.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with tqdm(disable=True) as bar:
            run_tasks(sleeper, [0, 1], {"dir": sys.argv[1]}, parse_scheduler(sys.argv[2], 2), bar)
""")


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid``, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = dict(line.split(":\t", 1) for line in (entry / "status").read_text().splitlines() if ":\t" in line)
            except OSError:
                continue
            if not fields.get("State", "").startswith("Z"):
                parents[int(entry.name)] = int(fields["PPid"])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split(":", 1)[1].split()[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("scheduler", ["processes", "local-cluster:1"])
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_workers_do_not_outlive_a_killed_run(tmp_path, scheduler, how):
    script = tmp_path / "run.py"
    script.write_text(WORKER_SCRIPT)
    pids = tmp_path / "pids"
    pids.mkdir()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    parent = subprocess.Popen([sys.executable, str(script), str(pids), scheduler], env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(pids.iterdir()):
            assert parent.poll() is None, parent.stderr.read().decode()
            assert time.monotonic() < deadline, "no task started"
            time.sleep(0.2)
        workers = {int(p.stem) for p in pids.iterdir()}
        descendants = _children(parent.pid)
        assert workers <= descendants
        parent.send_signal(how)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(map(_alive, descendants)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in descendants if _alive(pid)], f"left running after {how.name}"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in {int(p.stem) for p in pids.iterdir()}:  # a worker left behind: ours while it runs spawn_main
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
