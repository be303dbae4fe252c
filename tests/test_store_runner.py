"""The Zarr image stores (generic and typed) and the incremental dask runner, on every scheduler, with a real per-image
function."""

from __future__ import annotations

import time

import numpy as np
import pytest
from tqdm import tqdm

from medfocus.pipeline.images import load_image
from medfocus.pipeline.runner import Outcome, WorkItem, parse_scheduler, run_incremental, run_tasks
from medfocus.pipeline.store import (
    FeatureStore,
    ImageStore,
    IncompleteImageError,
    MaskStore,
    StoreMismatchError,
    StoreMissingError,
    store_key,
)

from .conftest import write_image


def column_means(items: list[WorkItem], context: dict) -> list[Outcome]:
    """A real per-image computation (mean of each column) written to the store like a stage does."""
    store = ImageStore(context["store_url"])
    outcomes = []
    for item in items:
        try:
            image = load_image(item.path)
            store.write_image(item.hash, {"means": image.mean(axis=(0, 2))}, {"shape": list(image.shape)})
            outcomes.append(Outcome(item.hash, item.path, True))
        except Exception as error:
            outcomes.append(Outcome(item.hash, item.path, False, str(error)))
    return outcomes


@pytest.fixture
def items(tmp_path) -> list[WorkItem]:
    paths = [write_image(tmp_path / "imgs" / f"{i}.png", seed=i, size=24) for i in range(7)]
    return [WorkItem(f"h{i:02d}", str(p)) for i, p in enumerate(paths)]


def _store(tmp_path, name="s.zarr") -> ImageStore:
    return ImageStore.create_or_open(str(tmp_path / name), "key1", {"setting": 1}, {"versions": {}})


def test_store_key_depends_on_every_setting():
    assert store_key({"a": 1, "b": [1, 2]}) == store_key({"b": [1, 2], "a": 1})
    assert store_key({"a": 1}) != store_key({"a": 2})


def test_store_refuses_other_settings(tmp_path):
    _store(tmp_path)
    with pytest.raises(StoreMismatchError):
        ImageStore.create_or_open(str(tmp_path / "s.zarr"), "key2", {}, {})


def test_half_written_image_is_not_done_and_is_overwritten(tmp_path):
    store = _store(tmp_path)
    group = store.root["images"].create_group("abc")
    group.create_array("means", data=np.zeros(3))  # killed before the completion flag
    assert not store.is_done("abc")
    with pytest.raises(IncompleteImageError):
        store.read_image("abc")
    store.write_image("abc", {"roi": np.ones((2, 2), bool)}, {"n": 1})
    arrays, attrs = store.read_image("abc")
    assert set(arrays) == {"roi"} and attrs == {"n": 1, "complete": True}


def test_mask_store_writes_masks_and_embedding_and_looks_up_by_key(tmp_path):
    url = str(tmp_path / "masks" / "k1.zarr")
    with pytest.raises(StoreMissingError, match="medfocus segment --dataset demo"):
        MaskStore.lookup(url, "k1", "demo")
    store = MaskStore.create(url, "k1", {"policy": "whole-image"}, {"versions": {}})
    labels = np.arange(16, dtype=np.int64).reshape(4, 4)
    embedding = {"global": np.ones(8), "patches": np.zeros((4, 8)), "roi_weights": np.full(4, 0.5), "roi_global": np.ones(8)}
    store.write("img", labels, labels > 7, {"roi_index": 1}, embedding)
    store.write("no-embedding", labels, labels > 7, {"roi_index": None})
    roi, stored_labels = MaskStore.lookup(url, "k1", "demo").read_masks("img")
    assert stored_labels.dtype == np.uint16 and roi.dtype == bool and np.array_equal(roi, labels > 7)
    read = store.read_embedding("img")
    assert set(read) == set(embedding) and all(read[name].dtype == np.float32 for name in read)
    with pytest.raises(IncompleteImageError, match="no embedding for this image"):
        store.read_embedding("absent")
    with pytest.raises(IncompleteImageError, match="rerun `medfocus segment`"):
        store.read_masks("absent")
    with pytest.raises(StoreMismatchError):  # another key at this location: made with other settings
        MaskStore.lookup(url, "k2", "demo")


def test_feature_store_text_is_checked_against_the_prompts(tmp_path):
    url = str(tmp_path / "features" / "f1.zarr")
    with pytest.raises(StoreMissingError, match="medfocus features --dataset demo --mode dual"):
        FeatureStore.lookup(url, "f1", "demo", "dual")
    store = FeatureStore.create(url, "f1", {"mode": "dual"}, {})
    store.write_features("img", {"global": np.ones(4), "patches": np.ones((2, 4)), "roi_weights": np.ones(2),
                                 "roi_global": np.ones(4)}, np.dtype("float16"))
    arrays, _ = store.read_image("img")
    assert arrays["global"].dtype == np.float16 and arrays["roi_weights"].dtype == np.float32
    assert store.array_names() == ("global", "patches", "roi_weights", "roi_global")
    text = {"class_names": ["a", "b"], "prompts": {"a": ["an a"], "b": ["a b", "the b"]}}
    assert not store.text_matches(text)
    store.write_text(text, np.ones((3, 4)), [0, 1, 1], ["an a", "a b", "the b"])
    assert store.text_matches(text)
    assert not store.text_matches(text | {"prompts": {"a": ["an a"], "b": ["a b"]}})  # an edited prompt
    assert not store.text_matches(None)  # an encoder without text must not read another's text
    store.write_text(text | {"prompts": {"a": ["an a"], "b": ["a b"]}}, np.zeros((2, 4)), [0, 1], ["an a", "a b"])
    assert store.read_shared("text")[0].shape == (2, 4)  # rewritten, not kept


@pytest.mark.parametrize("scheduler", ["synchronous", "threads", "processes", "local-cluster:2"])
def test_every_scheduler_gives_the_same_store(tmp_path, items, scheduler):
    reference = _store(tmp_path, "ref.zarr")
    run_incremental(items, reference.done, column_means, {"store_url": reference.url}, scheduler="synchronous", progress=False)
    store = _store(tmp_path, f"{scheduler.replace(':', '')}.zarr")
    summary = run_incremental(items, store.done, column_means, {"store_url": store.url}, scheduler=scheduler,
                              workers=2, chunk_size=3, progress=False)
    assert (summary.processed, summary.skipped, summary.failed) == (7, 0, [])
    for item in items:
        ours, ref = store.read_image(item.hash), reference.read_image(item.hash)
        assert np.array_equal(ours[0]["means"], ref[0]["means"]) and ours[1] == ref[1]


def started_at(task: int, context: dict) -> list[tuple[int, float]]:
    return [(task, time.monotonic())]


@pytest.mark.parametrize("scheduler", ["synchronous", "threads", "processes", "local-cluster"])
def test_tasks_start_in_list_order(scheduler):
    # evaluate lists its longest fits first; one worker shows the order in which the scheduler starts them
    results = run_tasks(started_at, list(range(12)), {}, parse_scheduler(scheduler, workers=1), tqdm(disable=True))
    assert [task for task, _ in sorted(results, key=lambda result: result[1])] == list(range(12))


def test_rerun_skips_done_and_processes_only_new(tmp_path, items):
    store = _store(tmp_path)
    first = run_incremental(items[:5], store.done, column_means, {"store_url": store.url}, progress=False)
    again = run_incremental(items[:5], store.done, column_means, {"store_url": store.url}, progress=False)
    more = run_incremental(items, store.done, column_means, {"store_url": store.url}, progress=False)
    assert (first.processed, again.processed, again.skipped) == (5, 0, 5)
    assert (more.processed, more.skipped) == (2, 5)


def test_failures_are_reported_and_the_run_goes_on(tmp_path, items):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    store = _store(tmp_path)
    summary = run_incremental(items + [WorkItem("bad", str(bad))], store.done, column_means, {"store_url": store.url},
                              chunk_size=4, progress=False)
    assert summary.processed == 7
    assert [f["hash"] for f in summary.failed] == ["bad"] and summary.failed[0]["reason"]
    assert summary.to_dict()["failed_count"] == 1
    retry = run_incremental(items + [WorkItem("bad", str(bad))], store.done, column_means, {"store_url": store.url}, progress=False)
    assert retry.processed == 0 and retry.skipped == 7 and len(retry.failed) == 1  # failed images are retried, never marked done


@pytest.mark.parametrize("value", ["threads", "processes", "synchronous", "local-cluster", "local-cluster:3", "tcp://10.0.0.1:8786"])
def test_scheduler_names(value):
    parse_scheduler(value)


def test_bad_scheduler_name():
    with pytest.raises(ValueError, match="scheduler 'gpu-farm'"):
        parse_scheduler("gpu-farm")
