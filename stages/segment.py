"""The segment stage: every image of a dataset through the segmenter once, into a Zarr v3 mask store.

The store lives at ``cache/<dataset>/masks/<key>.zarr`` where the key hashes the segmenter's full description
(backend, model, checkpoint hash or random-init, every parameter, ROI policy, stored resolution), so settings never mix.
Per image (found by content hash): ``labels`` (uint16 instance label map), ``roi`` (bool), and per-mask metadata.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from medfocus.pipeline.config import Params, SegmentParams
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.images import load_image
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.provenance import is_random_init, package_versions
from medfocus.pipeline.runner import Outcome, WorkItem, run_incremental
from medfocus.pipeline.segmenters import create_segmenter, default_policy_for
from medfocus.pipeline.store import ImageStore, store_key

from .common import PreparedDataset, load_prepared, per_thread_model, set_torch_threads, write_stage_summary

log = logging.getLogger(__name__)

MASK_STORE_FORMAT = 1


def segmenter_options(settings: SegmentParams, dataset: str) -> dict:
    """The factory arguments of the configured segmenter (JSON-able: they travel to dask workers)."""
    options = {
        "backend": settings.backend,
        "policy": default_policy_for(dataset) if settings.policy == "auto" else settings.policy,
        "store_resolution": settings.store_resolution,
        "device": settings.device,
        "allow_random_init": settings.allow_random_init,
    }
    if settings.backend == "sam2":
        options |= {"model_size": settings.sam2_model, "checkpoint": settings.sam2_checkpoint,
                    "mode": settings.sam2_mode, "points_per_side": settings.points_per_side}
    return options


def mask_store_spec(description: dict) -> dict:
    return {"format": MASK_STORE_FORMAT, "segmenter": description}


def open_mask_store(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> tuple[ImageStore, dict]:
    """Build the segmenter once here (to learn its checkpoint hash, and fail early without weights) and open its store."""
    options = segmenter_options(params.segment, spec.name)
    segmenter = create_segmenter(**options)
    description = segmenter.describe()
    store_spec = mask_store_spec(description)
    key = store_key(store_spec)
    url = paths.store_url("masks", key, params.segment.store_root)
    store = ImageStore.create_or_open(url, key, store_spec, {"versions": package_versions(), "options": options})
    return store, options


class SegmentationMissingError(FileNotFoundError):
    """The mask store for the current segment settings has not been made yet."""


def current_mask_store(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> ImageStore:
    """The mask store the last segment run wrote, provided it was made with today's segment settings."""
    if not paths.segment_summary.exists():
        raise SegmentationMissingError(f"no masks for {spec.name!r} yet: run `medfocus segment --dataset {spec.name}` first")
    summary = read_json(paths.segment_summary)
    wanted = segmenter_options(params.segment, spec.name)
    if summary.get("options") != wanted:
        raise SegmentationMissingError(
            f"the masks of {spec.name!r} were made with other segment settings ({summary.get('options')}), "
            f"not the current ones ({wanted}): run `medfocus segment --dataset {spec.name}` first"
        )
    return ImageStore(summary["store"], read_only=True)


def _segment_chunk(items: list[WorkItem], context: dict) -> list[Outcome]:
    set_torch_threads(context["workers"])
    options = context["options"]
    segmenter = per_thread_model(json.dumps(options, sort_keys=True), lambda: create_segmenter(**options))
    store = ImageStore(context["store_url"])
    outcomes = []
    for item in items:
        try:
            image = load_image(item.path)
            result = segmenter.segment(image)
            store.write_image(
                item.hash,
                {"labels": result.labels.astype(np.uint16), "roi": result.roi.astype(bool)},
                {"masks": result.masks, "roi_index": result.roi_index, "image_size": list(image.shape[:2])},
            )
            outcomes.append(Outcome(item.hash, item.path, True))
        except Exception as error:  # one bad image must not stop the run; its reason is reported
            outcomes.append(Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}"))
    return outcomes


def segment(spec: DatasetSpec, params: Params, paths: DatasetPaths, progress: bool = True) -> dict:
    """Segment what is not in the store yet; write ``segment.json``; return it."""
    prepared: PreparedDataset = load_prepared(spec, params, paths, progress=progress)
    store, options = open_mask_store(spec, params, paths)
    description = store.attrs["spec"]["segmenter"]
    weights = description.get("checkpoint_sha256", description.get("weights", ""))
    if is_random_init(json.dumps(description)):
        log.warning("RANDOM-INIT SEGMENTER: masks in %s come from a segmenter without trained weights", store.url)
    settings = params.segment
    run = run_incremental(
        prepared.work_items(),
        store.done,
        _segment_chunk,
        {"options": options, "store_url": store.url, "workers": settings.workers},
        scheduler=settings.scheduler,
        workers=settings.workers,
        chunk_size=settings.chunk_size,
        description=f"segment {spec.name}",
        progress=progress,
    )
    for failure in run.failed:
        log.warning("segmentation failed for %s: %s", failure["path"], failure["reason"])
    summary = write_stage_summary(
        paths.segment_summary,
        "segment",
        run,
        dataset=spec.name,
        store=store.url,
        store_key=store.key,
        segmenter=description,
        policy=options["policy"],
        options=options,
        weights=weights,
    )
    return summary
