"""The Zarr image store and the incremental dask runner, on every scheduler, with a real per-image function."""

from __future__ import annotations

import numpy as np
import pytest

from medfocus.pipeline.images import load_image
from medfocus.pipeline.runner import Outcome, WorkItem, parse_scheduler, run_incremental
from medfocus.pipeline.store import ImageStore, IncompleteImageError, StoreMismatchError, store_key

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
