"""The segment stage: every image of a dataset through the segmenter once, into a Zarr v3 mask store.

The store lives at ``cache/<dataset>/masks/<key>.zarr`` where the key hashes the segmenter's full description
(backend, model, checkpoint hash or random-init, every parameter, ROI policy, stored resolution), so settings never mix.
Per image (found by content hash): ``labels`` (uint16 instance label map), ``roi`` (bool), and per-mask metadata.
A worker checks each file's content against its manifest hash before segmenting it, and builds the segmenter from the
options the driver resolved (a SAM2 checkpoint is looked up once), checking it against the driver's description.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from medfocus.pipeline.config import Params, SegmentParams
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.provenance import is_random_init, package_versions
from medfocus.pipeline.runner import Outcome, WorkItem, run_incremental
from medfocus.pipeline.segmenters import WeightsUnavailableError, create_segmenter, default_policy_for
from medfocus.pipeline.segmenters.sam2_segmenter import resolve_sam2_checkpoint
from medfocus.pipeline.store import ImageStore, canonical_json, store_key

from .common import (
    PreparedDataset,
    check_same_model,
    load_manifest_image,
    load_prepared,
    per_thread_model,
    set_torch_threads,
    write_stage_summary,
)

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
                    "mode": settings.sam2_mode, "points_per_side": settings.points_per_side,
                    "image_size": settings.sam2_image_size}
    return options


def resolved_segmenter_options(options: dict) -> dict:
    """``options`` with SAM2's ``checkpoint="auto"`` resolved, once, by the caller: the file the Hugging Face cache holds,
    or no weights (``pretrained=False``, the same seeded random init) where ``allow_random_init`` lets it fall back.

    Workers build from these, so none of them asks the hub again (offline, every ask waits for the hub client's
    retries). Other settings need no resolving: LiteMedSAM's weights ship inside its package.
    """
    if options["backend"] != "sam2" or options.get("checkpoint") != "auto":
        return options
    try:
        return options | {"checkpoint": resolve_sam2_checkpoint(options["model_size"], "auto")}
    except WeightsUnavailableError as error:
        if not options["allow_random_init"]:
            raise
        log.warning("%s -- building random-init SAM2 because allow_random_init=True", error)
        return options | {"pretrained": False}


def shared_segmenter(build_options: dict):
    """The segmenter for resolved options, one per thread (the driver's is reused by work that runs in its thread)."""
    return per_thread_model("segmenter:" + canonical_json(build_options), lambda: create_segmenter(**build_options))


def mask_store_spec(description: dict) -> dict:
    return {"format": MASK_STORE_FORMAT, "segmenter": description}


def open_mask_store(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> tuple[ImageStore, dict, dict]:
    """Build the segmenter once here (to learn its checkpoint hash, and fail early without weights) and open its store.

    Returns the store, the segment options as configured (what ``segment.json`` records) and the resolved options the
    workers build their segmenters from.
    """
    options = segmenter_options(params.segment, spec.name)
    build_options = resolved_segmenter_options(options)
    description = shared_segmenter(build_options).describe()
    store_spec = mask_store_spec(description)
    key = store_key(store_spec)
    url = paths.store_url("masks", key, params.segment.store_root)
    store = ImageStore.create_or_open(url, key, store_spec, {"versions": package_versions(), "options": options})
    return store, options, build_options


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
    try:
        segmenter = shared_segmenter(context["build_options"])
        check_same_model(segmenter.describe(), context["segmenter"], "segmenter")
    except Exception as error:  # a worker that cannot build the driver's segmenter fails its images, with the reason
        return [Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}") for item in items]
    store = ImageStore(context["store_url"])
    outcomes = []
    for item in items:
        try:
            image = load_manifest_image(item)
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
    store, options, build_options = open_mask_store(spec, params, paths)
    description = store.attrs["spec"]["segmenter"]
    weights = description.get("checkpoint_sha256", description.get("weights", ""))
    if is_random_init(json.dumps(description)):
        log.warning("RANDOM-INIT SEGMENTER: masks in %s come from a segmenter without trained weights", store.url)
    settings = params.segment
    run = run_incremental(
        prepared.work_items(),
        store.done,
        _segment_chunk,
        {"build_options": build_options, "segmenter": description, "store_url": store.url, "workers": settings.workers},
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
        prepared.unreadable(),
        dataset=spec.name,
        store=store.url,
        store_key=store.key,
        segmenter=description,
        policy=options["policy"],
        options=options,
        weights=weights,
    )
    return summary
