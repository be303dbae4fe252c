"""Train, evaluate and predict on cached features of the demo dataset (LiteMedSAM masks, random-init ViT-B-32).

Every number here comes from a random-init encoder: the tests check the pipeline (determinism, refusals, outputs),
never accuracy.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfocus.pipeline.config import ConfigError, load_params, parse_params
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.images import file_sha256
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.store import ImageStore
from medfocus.pipeline.preparation import load_prepared
from medfocus.stages.evaluate import run_protocol
from medfocus.pipeline.cached_features import load_cached_features
from medfocus.pipeline.current_stores import current_feature_store
from medfocus.pipeline.trained_heads import HeadRequest, load_head
from medfocus.trainer import MethodUnavailableError, ModelMismatchError, TrainConfig, fit, synthetic_task

from .test_segment_stage import medfocus, stage_json, write_params

DATASET = "demo"
CLASSES = ["cyst", "nodule", "spiculated_mass"]
SETTINGS = {
    "prepare": {"demo_images_per_class": 2, "fractions": [1.0], "shots": [1], "subset_seeds": [0, 1]},
    "segment": {"scheduler": "synchronous", "policy": "whole-image"},
    "features": {"model": "ViT-B-32", "scheduler": "synchronous", "pretrained": "none", "modes": ["none", "attention"]},
    "train": {"method": "medfocus", "mode": "attention", "fraction": 1.0, "epochs": 10},
    "evaluate": {"methods": ["zero_shot", "linear_probe", "medfocus", "medfocus_dual"], "modes": ["none", "attention"],
                 "fractions": [1.0], "seeds": [0], "scheduler": "synchronous"},
}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> dict:
    """The demo dataset segmented and encoded in modes none and attention."""
    base = tmp_path_factory.mktemp("train")
    root, cache = base / "data", base / "cache"
    params = write_params(base, **SETTINGS)
    common = ("-d", DATASET, "--root", root, "--params", params, "--cache-dir", cache)
    assert stage_json(medfocus("segment", *common, "-q"))["processed"] == 6
    assert stage_json(medfocus("features", *common, "-q"))["processed"] == 12
    return {"root": root, "cache": cache, "params": params, "common": common}


def train(run: dict, *options) -> dict:
    return stage_json(medfocus("train", *run["common"], *options))


def saved(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_twice_with_one_seed_saves_the_same_head(encoded, tmp_path):
    first = train(encoded)
    kept = shutil.copy(first["model"], tmp_path / "first.pt")
    second = train(encoded)
    assert second["model"] == first["model"] and second["weights_source"] == "random-init"
    one, two = saved(kept), saved(second["model"])
    assert one["state_dict"].keys() == two["state_dict"].keys()
    assert all(torch.equal(one["state_dict"][name], two["state_dict"][name]) for name in one["state_dict"])
    assert one["config"] == two["config"] and one["meta"] == two["meta"]
    assert {k: v for k, v in one["fit_info"].items() if k != "fit_seconds"} == \
           {k: v for k, v in two["fit_info"].items() if k != "fit_seconds"}
    # Another seed trains another head: the comparison above could have failed.
    other = saved(train(encoded, "--seed", "1")["model"])
    assert not all(torch.equal(one["state_dict"][name], other["state_dict"][name]) for name in one["state_dict"])


def test_a_head_is_refused_for_features_of_another_mode_or_model(encoded, tmp_path):
    head = train(encoded)["model"]
    image = sorted((encoded["root"] / "cyst").glob("*.png"))[0]
    other_mode = medfocus("predict", image, *encoded["common"], "--mode", "none", "--head", head)
    assert other_mode.exit_code == 2
    assert "refusing the model" in other_mode.stderr and "mode: saved 'attention', expected 'none'" in other_mode.stderr

    spec, paths = resolve_dataset(DATASET, encoded["root"]), DatasetPaths(DATASET, encoded["cache"])
    params = load_params(encoded["params"])
    prepared = load_prepared(spec, params, paths, progress=False)
    request = HeadRequest.from_settings(params.train)
    none_store = current_feature_store(spec, params, paths, "none")
    with pytest.raises(ModelMismatchError, match="feature_store_key"):
        load_head(paths, request, none_store, params.train, prepared, Path(head))
    attention_store = current_feature_store(spec, params, paths, "attention")
    assert load_head(paths, request, attention_store, params.train, prepared, Path(head))[0].method == "medfocus"

    # Another encoder model: its own features, and the head trained on ViT-B-32 features is refused for them.
    cache = tmp_path / "cache"
    shutil.copytree(encoded["cache"], cache)
    other_model = write_params(tmp_path, **(SETTINGS | {"features": SETTINGS["features"] | {"model": "ViT-S-32"}}))
    common = ("-d", DATASET, "--root", encoded["root"], "--params", other_model, "--cache-dir", cache)
    assert stage_json(medfocus("features", *common, "-q", "--mode", "attention"))["processed"] == 6
    refused = medfocus("predict", image, *common, "--head", head)
    assert refused.exit_code == 2
    assert "refusing the model" in refused.stderr and "feature_store_key" in refused.stderr


def test_evaluate_writes_metrics_runs_and_plots_marked_random_init(encoded):
    result = medfocus("evaluate", *encoded["common"], "-q")
    assert result.exit_code == 0, result.output
    overview = json.loads(result.stdout)
    assert overview["weights_source"] == "random-init" and overview["random_init"] is True
    # The headline for the reader comes last, on stderr, random-init first (medfocus.pipeline.results_summary).
    assert "\n!! RANDOM-INIT: NOT REAL RESULTS." in result.stderr and "\n1. At " in result.stderr
    assert result.stderr.rstrip().endswith("metrics.json") and overview["headline"]["random_init"] is True
    metrics = json.loads((encoded["cache"] / DATASET / "metrics.json").read_text())
    assert metrics["weights_source"] == "random-init" and metrics["random_init"] is True
    assert "RANDOM-INIT" in metrics["warning"]
    assert {(row["method"], row["mode"]) for row in metrics["results"]} == {
        (method, mode) for method in ("zero_shot", "linear_probe", "medfocus") for mode in ("none", "attention")}
    assert all(row["weights_source"] == "random-init" for row in metrics["results"])
    assert set(metrics["skipped_methods"]) == {"medfocus_dual/none", "medfocus_dual/attention"}  # no ROI view in these stores
    for row in metrics["results"]:
        low, high = row["accuracy_ci95"]
        assert 0.0 <= low <= row["accuracy"] <= high <= 100.0
    assert metrics["images"]["test_images_left_out"] == 0 and metrics["images"]["test_images"] == metrics["test_images"]
    shown = metrics["confusion_matrix"]
    assert (shown["method"], shown["mode"], shown["fraction"], shown["seed"]) == ("medfocus", "attention", 1.0, 0)
    assert shown["chosen_by"] == "train.method/train.mode, 100%, seed 0"
    assert metrics["paper"] is None  # the paper has no demo numbers
    evaluation = encoded["cache"] / DATASET / "evaluation"
    with (evaluation / "runs.csv").open() as handle:
        runs = list(csv.DictReader(handle))
    assert len(runs) == 6 and {run["weights_source"] for run in runs} == {"random-init"}
    assert all(0.0 <= float(run["accuracy"]) <= 1.0 for run in runs)
    assert "correct" not in runs[0] and json.loads(runs[0]["accuracy_ci95"])[0] <= float(runs[0]["accuracy"])
    probes = [run for run in runs if run["method"] == "linear_probe"]
    assert probes and all("C" in json.loads(run["hyperparameters"]) for run in probes)  # what validation chose, per run
    for plot in ("accuracy_vs_fraction.png", "confusion_matrix.png"):
        with Image.open(evaluation / plot) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100
            assert np.asarray(picture.convert("L")).std() > 5  # something is drawn


def test_evaluate_compares_modes_on_the_same_test_images(encoded, monkeypatch):
    spec, paths = resolve_dataset(DATASET, encoded["root"]), DatasetPaths(DATASET, encoded["cache"])
    params = load_params(encoded["params"])
    prepared = load_prepared(spec, params, paths, progress=False)
    test_hashes = [entry.hash for entry in prepared.entries if entry.split == "test"]
    failed = test_hashes[0]
    done = ImageStore.done

    def attention_store_lost_one_image(store, digests):
        finished = done(store, digests)
        return finished - {failed} if store.attrs["spec"]["mode"] == "attention" else finished

    monkeypatch.setattr(ImageStore, "done", attention_store_lost_one_image)
    runs, identity = run_protocol(spec, params, paths, progress=False)
    assert identity["images"]["test_images_left_out"] == 1 and identity["images"]["test_images"] == len(test_hashes) - 1
    assert {run["n_samples"] for run in runs} == {len(test_hashes) - 1}  # the none mode is scored without it too
    assert {run["mode"] for run in runs} == {"none", "attention"}


def test_evaluate_gives_the_same_runs_on_every_scheduler(encoded):
    """Each fit is seeded by its run, so dask's processes scheduler and a dask.distributed cluster (one torch thread per
    worker) give the synchronous scheduler's runs, in the same order."""
    spec, paths = resolve_dataset(DATASET, encoded["root"]), DatasetPaths(DATASET, encoded["cache"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the synchronous run with the thread count each worker gets
    try:
        runs = {}
        for scheduler in ("synchronous", "processes", "local-cluster"):
            params = load_params(encoded["params"], overrides={
                "evaluate.scheduler": scheduler, "evaluate.workers": 2, "evaluate.seeds": [0, 1],
                "evaluate.methods": ["linear_probe", "medfocus"]})
            found, _ = run_protocol(spec, params, paths, progress=False)
            runs[scheduler] = [(run["method"], run["mode"], run["seed"], run["correct"], run["hyperparameters"]) for run in found]
    finally:
        torch.set_num_threads(threads)
    assert len(runs["synchronous"]) == 2 * 2 * 2  # methods x modes x seeds
    assert runs["processes"] == runs["synchronous"] and runs["local-cluster"] == runs["synchronous"]


def test_a_dual_store_gives_the_roi_view_to_medfocus_dual(encoded, tmp_path):
    spec, paths = resolve_dataset(DATASET, encoded["root"]), DatasetPaths(DATASET, encoded["cache"])
    params = load_params(encoded["params"])
    prepared = load_prepared(spec, params, paths, progress=False)
    synthetic, text = synthetic_task(len(prepared.entries), num_classes=3, embed_dim=32, num_patches=16, roi_view_signal=0.6)
    # A hand-made store of mode "dual": the per-image arrays the features stage writes, plus roi_global.
    store = ImageStore.create_or_open(str(tmp_path / "dual.zarr"), "handmade", {"mode": "dual", "encoder": {"model": "synthetic"}},
                                      {"weights_source": "random-init"})
    for row, entry in enumerate(prepared.entries):
        store.write_image(entry.hash, {"global": synthetic.global_emb[row].numpy(), "patches": synthetic.patch_tokens[row].numpy(),
                                       "roi_weights": synthetic.roi_weights[row].numpy(), "roi_global": synthetic.roi_global[row].numpy()})
    cached = load_cached_features(prepared, store)
    assert cached.mode == "dual" and cached.features.roi_global.shape == (len(prepared.entries), 32)
    assert torch.equal(cached.features.roi_global, synthetic.roi_global)
    model = fit("medfocus_dual", cached.features.subset(cached.splits["train"]), cached.text, TrainConfig(epochs=5), seed=0)
    assert model.predict_proba(cached.features.subset(cached.splits["test"])).shape == (len(cached.splits["test"]), 3)

    plain = load_cached_features(prepared, current_feature_store(spec, params, paths, "none"))
    assert plain.features.roi_global is None
    with pytest.raises(MethodUnavailableError, match="roi_global"):
        fit("medfocus_dual", plain.features, plain.text, TrainConfig(epochs=5), seed=0)


@pytest.mark.parametrize(("section", "value", "named"), [
    ({"train": {"method": "medfocs"}}, "medfocs", "train.method"),
    ({"train": {"mode": "atention"}}, "atention", "train.mode"),
    ({"evaluate": {"methods": ["zero_shot", "tip"]}}, "tip", "evaluate.methods.1"),
    ({"evaluate": {"modes": ["none", "dula"]}}, "dula", "evaluate.modes.1"),
    ({"train": {"method": "medfocus_dual", "mode": "crop"}}, "needs the features of mode 'dual'", "train"),
])
def test_a_typo_in_train_or_evaluate_is_refused_with_the_key(section, value, named):
    with pytest.raises(ConfigError) as caught:
        parse_params(section)
    assert named in str(caught.value) and value in str(caught.value)
    assert parse_params({"train": {"method": "medfocus_dual", "mode": "dual"}, "evaluate": {"modes": ["dual", "none"]}}).evaluate.modes == ["dual", "none"]


def test_predict_writes_overlays_and_reproduces_the_training_features(encoded, tmp_path):
    head = train(encoded)["model"]
    images = []
    for folder, name in (("a", "cyst"), ("b", "nodule")):
        (tmp_path / folder).mkdir()
        images.append(Path(shutil.copy(sorted((encoded["root"] / name).glob("*.png"))[0], tmp_path / folder / "scan.png")))
    result = medfocus("predict", *images, *encoded["common"], "--head", head)
    assert result.exit_code == 0, result.output
    predictions = json.loads((encoded["cache"] / DATASET / "predictions" / "predictions.json").read_text())
    assert [p["image"] for p in predictions] == [str(path) for path in images]
    overlays = {p["overlay"] for p in predictions}
    assert len(overlays) == 2  # same file name, different images: two overlays
    for prediction in predictions:
        probabilities = prediction["probabilities"]
        assert list(probabilities) == CLASSES and prediction["class"] in CLASSES
        assert abs(sum(probabilities.values()) - 1.0) < 1e-5 and all(0.0 <= p <= 1.0 for p in probabilities.values())
        assert prediction["weights_source"] == "random-init"
        with Image.open(prediction["overlay"]) as picture:
            assert picture.format == "PNG" and np.asarray(picture.convert("L")).std() > 5

    # A dataset image gets the probabilities the head gives its stored training features.
    spec, paths = resolve_dataset(DATASET, encoded["root"]), DatasetPaths(DATASET, encoded["cache"])
    params = load_params(encoded["params"])
    store = current_feature_store(spec, params, paths, "attention")
    cached = load_cached_features(load_prepared(spec, params, paths, progress=False), store)
    row = cached.features.hashes.index(file_sha256(images[0]))
    prepared = load_prepared(spec, params, paths, progress=False)
    model, _ = load_head(paths, HeadRequest.from_settings(params.train), store, params.train, prepared, Path(head))
    stored = model.predict_proba(cached.features.subset([row]))[0]
    np.testing.assert_allclose([predictions[0]["probabilities"][c] for c in CLASSES], stored.numpy(), atol=2e-3)


def test_predict_refuses_a_missing_image_file(encoded, tmp_path):
    result = medfocus("predict", tmp_path / "absent.png", *encoded["common"])
    assert result.exit_code == 2 and "no such image file" in result.stderr
