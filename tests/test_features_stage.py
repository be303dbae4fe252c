"""The features stage end to end: masks from real LiteMedSAM, a random-init open_clip ViT-B-32, real Zarr and dask.

The demo dataset (six generated images) is segmented once with one image failing, so that the modes that need masks
have an image without them. Which store train and evaluate read is decided by today's spec alone (pipeline.current_stores).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest

from medfocus.pipeline.config import load_params
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.encoders import create_encoder
from medfocus.pipeline.images import file_sha256, load_image
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.specs import resolve_encoders
from medfocus.pipeline.store import ImageStore, StoreMissingError, canonical_json
from medfocus.pipeline.featurize import build_encoder, encode_steered
from medfocus.pipeline.current_stores import current_feature_store

from .test_segment_stage import corrupt_in_place, listing_blind_to_rewrites, medfocus, stage_json, write_params

DATASET = "demo"
MODES = ["none", "overlay", "attention"]
SETTINGS = {
    "prepare": {"demo_images_per_class": 2, "fractions": [1.0], "shots": [1], "subset_seeds": [0]},
    "segment": {"scheduler": "synchronous", "policy": "whole-image"},
    "features": {"scheduler": "synchronous", "model": "ViT-B-32", "pretrained": "none", "modes": MODES, "batch_size": 4},
}


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> dict:
    """The demo dataset prepared and segmented; one image's segmentation failed (it was unreadable then)."""
    base = tmp_path_factory.mktemp("features")
    root, cache = base / "data", base / "cache"
    params = write_params(base, **SETTINGS)
    common = ("-d", DATASET, "--root", root, "--params", params, "--cache-dir", cache, "-q")
    with listing_blind_to_rewrites():  # the rewrite reaches the segmenter, whose own hash check fails the image
        assert medfocus("prepare", *common).exit_code == 0
        unlucky = sorted((root / "nodule").glob("*.png"))[0]
        content, stat = unlucky.read_bytes(), unlucky.stat()
        corrupt_in_place(unlucky)
        segment = stage_json(medfocus("segment", *common))
    assert (segment["processed"], segment["failed_count"]) == (5, 1)
    unlucky.write_bytes(content)  # readable again, the same content as prepared: no masks for it
    os.utime(unlucky, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return {"root": root, "cache": cache, "params": params, "common": common, "unlucky": unlucky}


def copy_of(segmented: dict, folder: Path) -> dict:
    """The segmented dataset with its own cache, for a test that changes what the cache holds."""
    cache = folder / "cache"
    shutil.copytree(segmented["cache"], cache)
    common = ("-d", DATASET, "--root", segmented["root"], "--params", segmented["params"], "--cache-dir", cache, "-q")
    return segmented | {"cache": cache, "common": common}


def features_json(cache: Path) -> dict:
    return json.loads((cache / DATASET / "features.json").read_text())


def test_three_modes_have_their_own_stores_rerun_is_free_and_failures_have_reasons(segmented, tmp_path):
    run = copy_of(segmented, tmp_path)
    first = medfocus("features", *run["common"])
    assert first.exit_code == 0, first.output
    overview = json.loads(first.stdout)
    stores = overview["stores"]
    assert sorted(stores) == sorted(MODES) and len(set(stores.values())) == 3
    assert (overview["processed"], overview["failed_count"]) == (16, 2)
    assert all(str(segmented["unlucky"]) in line and "no masks for this image" in line for line in overview["failed"])
    summary = features_json(run["cache"])
    failed_modes = sorted(failure["mode"] for failure in summary["failed"])
    assert failed_modes == ["attention", "overlay"]
    assert {mode: summary["modes"][mode]["done"] for mode in MODES} == {"none": 6, "overlay": 5, "attention": 5}
    assert {mode: summary["modes"][mode]["store_key"] for mode in MODES} == {
        mode: Path(url).name.removesuffix(".zarr") for mode, url in stores.items()}
    # features.json holds content only; how the run went is in features.run.json.
    assert "processed" not in summary and "seconds" not in json.dumps(summary)
    run_record = json.loads((run["cache"] / DATASET / "features.run.json").read_text())
    assert {mode: run_record["modes"][mode]["processed"] for mode in MODES} == {"none": 6, "overlay": 5, "attention": 5}

    # Random init is said everywhere: summary, store attributes, encoder description.
    assert overview["weights_source"] == "random-init"
    assert summary["random_init"] is True and "random-init" in summary["warning"]
    segment_key = json.loads((run["cache"] / DATASET / "segment.json").read_text())["store_key"]
    for mode, url in stores.items():
        store = ImageStore(url, read_only=True)
        attrs = store.attrs
        assert attrs["spec"]["mode"] == mode
        assert attrs["provenance"]["weights_source"] == "random-init"
        assert attrs["spec"]["encoder"]["weights_source"] == attrs["spec"]["encoder"]["weights_sha256"] == "random-init"
        assert attrs["spec"]["mask_store"] == (None if mode == "none" else segment_key)
        text, text_attrs = store.read_shared("text")
        assert text.shape == (12, 512) and text_attrs["class_names"] == ["cyst", "nodule", "spiculated_mass"]
        assert text_attrs["text"] == summary["text"]  # the prompts the embeddings were made from

    hashes = [line.split(",")[0] for line in (run["cache"] / DATASET / "manifest.csv").read_text().splitlines()[1:]]
    none_store, overlay_store = ImageStore(stores["none"], read_only=True), ImageStore(stores["overlay"], read_only=True)
    arrays, _ = none_store.read_image(hashes[0])
    assert arrays["global"].shape == (512,) and arrays["patches"].shape == (49, 512) and arrays["roi_weights"].shape == (49,)
    assert arrays["global"].dtype == np.float16
    steered = [h for h in overlay_store.done(hashes)
               if not np.array_equal(overlay_store.read_image(h)[0]["global"], none_store.read_image(h)[0]["global"])]
    assert steered, "painting the masks over the image changed no image's features"

    rerun = stage_json(medfocus("features", *run["common"]))
    assert (rerun["processed"], rerun["skipped"], rerun["failed_count"]) == (0, 16, 2)
    # One mode alone: features.json then describes that mode only, and train and evaluate still find the other
    # modes' stores, because a store is found by today's spec, not by a summary.
    alone = stage_json(medfocus("features", *run["common"], "--mode", "none"))
    assert (alone["processed"], alone["skipped"]) == (0, 6)
    index = features_json(run["cache"])
    assert list(index["modes"]) == ["none"] and "earlier_modes" not in index
    spec = resolve_dataset(DATASET, segmented["root"])
    found = current_feature_store(spec, load_params(segmented["params"]), DatasetPaths(DATASET, run["cache"]), "attention")
    assert found.url == stores["attention"]


@pytest.mark.slow
def test_mode_none_ignores_segment_settings_and_attention_follows_them(segmented, tmp_path):
    run = copy_of(segmented, tmp_path)
    before = stage_json(medfocus("features", *run["common"], "--mode", "none", "--mode", "attention"))["stores"]
    changed = write_params(tmp_path / "changed", **(SETTINGS | {"segment": SETTINGS["segment"] | {"store_resolution": 128}}))
    common = ("-d", DATASET, "--root", segmented["root"], "--params", changed, "--cache-dir", run["cache"], "-q")
    spec, paths = resolve_dataset(DATASET, segmented["root"]), DatasetPaths(DATASET, run["cache"])

    # No masks exist for the new settings, and mode none does not need any: same store, nothing to do.
    none_again = stage_json(medfocus("features", *common, "--mode", "none"))
    assert none_again["stores"]["none"] == before["none"] and none_again["processed"] == 0
    refused = medfocus("features", *common, "--mode", "attention")
    assert refused.exit_code == 2 and "medfocus segment" in refused.stderr
    # Masks of the new settings (the image unreadable before is readable now): the attention features steered by the
    # old masks are not today's (another mask store key, so another feature store key).
    assert stage_json(medfocus("segment", *common))["processed"] == 6
    with pytest.raises(StoreMissingError, match="medfocus features --dataset demo --mode attention"):
        current_feature_store(spec, load_params(changed), paths, "attention")
    after = stage_json(medfocus("features", *common, "--mode", "attention"))
    assert after["stores"]["attention"] != before["attention"] and after["processed"] == 6
    assert current_feature_store(spec, load_params(changed), paths, "attention").url == after["stores"]["attention"]
    assert current_feature_store(spec, load_params(changed), paths, "none").url == before["none"]


def test_auto_weights_are_resolved_once_and_random_init_is_announced_once(segmented, tmp_path, monkeypatch, caplog):
    run = copy_of(segmented, tmp_path)
    downloads = []
    real_download = open_clip.download_pretrained

    def counting_download(*args, **kwargs):
        downloads.append(args)
        return real_download(*args, **kwargs)

    monkeypatch.setattr(open_clip, "download_pretrained", counting_download)
    caplog.set_level(logging.WARNING)
    # Three chunks on two worker threads: every worker builds its own encoder.
    threaded = write_params(tmp_path / "threads", **(SETTINGS | {"features": SETTINGS["features"] | {
        "pretrained": "auto", "allow_random_init": True, "modes": ["none"], "scheduler": "threads", "workers": 2, "chunk_size": 2}}))
    overview = stage_json(medfocus("features", "-d", DATASET, "--root", segmented["root"], "--params", threaded,
                                   "--cache-dir", run["cache"], "-q"))
    assert overview["processed"] == 6 and overview["weights_source"] == "random-init"
    assert len(downloads) == 1  # the driver's one try; no worker asked again
    banners = [record for record in caplog.records if "RANDOM-INIT ENCODER" in record.getMessage()]
    assert len(banners) == 1 and "could not be had" in banners[0].getMessage()

    # The workers' encoder is the driver's random-init fallback (QuickGELU like the openai weights), not pretrained=none.
    store = ImageStore(overview["stores"]["none"], read_only=True)
    assert store.attrs["spec"]["encoder"]["quick_gelu"] is True
    image_path = sorted((segmented["root"] / "cyst").glob("*.png"))[0]
    image = load_image(image_path)
    stored = store.read_image(file_sha256(image_path))[0]
    resolved = resolve_encoders(load_params(threaded).features)[0]
    assert json.loads(canonical_json(resolved.identity)) == store.attrs["spec"]["encoder"]
    driver_encoder = build_encoder(resolved.build)
    zeros = np.zeros((1, 49), dtype=np.float32)
    expected, _ = encode_steered(driver_encoder, driver_encoder.preprocess(image)[None], zeros, "none", {})
    np.testing.assert_allclose(stored["global"].astype(np.float32), expected[0], rtol=2e-3, atol=2e-3)
    plain = create_encoder("ViT-B-32", "none")
    other, _ = encode_steered(plain, plain.preprocess(image)[None], zeros, "none", {})
    assert not np.allclose(other[0], expected[0], rtol=2e-3, atol=2e-3)


def test_attention_mode_is_refused_for_an_encoder_without_global_attention(segmented, tmp_path):
    run = copy_of(segmented, tmp_path)
    result = medfocus("features", *run["common"], "--model", "litemedsam", "--pretrained", "auto", "--mode", "attention")
    assert result.exit_code == 2
    assert "has none to bias" in result.stderr
    assert not (run["cache"] / DATASET / "features").exists()


def test_intensity_stretch_maps_the_foreground_onto_the_full_range():
    from medfocus.pipeline.featurize import encoder_input

    # A dim, low-contrast scan (grey 60-100) inside a black frame, tinted: the frame stays black, the scan fills 0-255.
    scan = np.zeros((64, 64, 3), dtype=np.uint8)
    ramp = np.linspace(60, 100, 48)[None, :].repeat(48, axis=0)
    scan[8:56, 8:56] = np.stack([ramp, ramp, ramp + 4], axis=2).round().astype(np.uint8)
    stretched = encoder_input(scan, "stretch")
    assert stretched.dtype == np.uint8 and stretched.shape == scan.shape
    assert (stretched[:8] == 0).all() and (stretched[:, :8] == 0).all()
    inner = stretched[8:56, 8:56].astype(int)
    assert inner[..., 0].min() <= 3 and inner[..., 0].max() >= 245
    assert (inner[..., 2] >= inner[..., 0]).all() and inner[..., 2].mean() > inner[..., 0].mean() + 10  # one map for all channels
    assert encoder_input(scan, "none") is scan
    flat = np.full((16, 16, 3), 80, dtype=np.uint8)
    assert (encoder_input(flat, "stretch") == flat).all() and (encoder_input(np.zeros_like(flat), "stretch") == 0).all()
    with pytest.raises(ValueError, match="unknown intensity setting 'equalise'"):
        encoder_input(scan, "equalise")
