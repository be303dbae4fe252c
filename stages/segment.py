"""The segment stage: every image of a dataset through the segmenter once, into a Zarr v3 mask store.

The store lives at ``cache/<dataset>/masks/<key>.zarr``; the key hashes the segment spec (pipeline.specs: backend,
model and weights sha256, ROI policy as data, stored resolution, the code that computes masks), so settings never mix
and edited code never reuses old masks. Per image (found by content hash): ``labels`` (uint16 instance label map),
``roi`` (bool), per-mask metadata, and for LiteMedSAM the image's pooled embedding (``embedding_*``), which the
features stage reads instead of encoding the image again.

Outputs: ``segment.json`` holds content only (the spec, which images are done or failed): DVC's dependency of later
stages. ``segment.run.json`` holds how the run went (timings, scheduler, store location): no stage depends on it.
"""

from __future__ import annotations

import logging

from medfocus.pipeline.config import Params
from medfocus.pipeline.current_stores import current_segment_spec, mask_store_url
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.external import external_content, external_work_items, load_externals
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.preparation import PreparedDataset, load_manifest_image, load_prepared
from medfocus.pipeline.provenance import package_versions
from medfocus.pipeline.runner import Outcome, WorkItem, run_incremental
from medfocus.pipeline.stage_outputs import write_stage_outputs
from medfocus.pipeline.store import MaskStore
from medfocus.pipeline.worker_models import check_same_model, set_torch_threads, shared_segmenter

log = logging.getLogger(__name__)


def _segment_chunk(items: list[WorkItem], context: dict) -> list[Outcome]:
    set_torch_threads(context["workers"])
    try:
        segmenter = shared_segmenter(context["build_options"])
        check_same_model({"weights_sha256": segmenter.describe()["checkpoint_sha256"]},
                         {"weights_sha256": context["weights_sha256"]}, "segmenter")
    except Exception as error:  # a worker that cannot build the driver's segmenter fails its images, with the reason
        return [Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}") for item in items]
    store = MaskStore(context["store_url"])
    outcomes = []
    for item in items:
        try:
            image = load_manifest_image(item)
            result = segmenter.segment(image)
            store.write(item.hash, result.labels, result.roi,
                        {"masks": result.masks, "roi_index": result.roi_index, "image_size": list(image.shape[:2])},
                        result.embedding)
            outcomes.append(Outcome(item.hash, item.path, True))
        except Exception as error:  # one bad image must not stop the run; its reason is reported
            outcomes.append(Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}"))
    return outcomes


def segment(dataset: DatasetSpec, params: Params, paths: DatasetPaths, progress: bool = True) -> dict:
    """Segment what is not in the store yet; write ``segment.json`` and ``segment.run.json``; return both merged."""
    prepared: PreparedDataset = load_prepared(dataset, params, paths, progress=progress)
    settings = params.segment
    spec = current_segment_spec(dataset, params, paths)
    if spec.random_init:
        log.warning("RANDOM-INIT SEGMENTER: the masks of %s come from a segmenter without trained weights", dataset.name)
    store = MaskStore.create(mask_store_url(paths, spec, params), spec.key, spec.content,
                             {"versions": package_versions(), "build_options": spec.build_options})
    # External test sets (pipeline.external) go into the same store with the same segmenter; their images add work
    # items only: the store's key, the manifest and the training dataset's counts below are unchanged.
    externals = load_externals(dataset, params, paths, prepared)
    run = run_incremental(
        prepared.work_items() + external_work_items(prepared, externals),
        store.done,
        _segment_chunk,
        {"build_options": spec.build_options, "weights_sha256": spec.content["model"]["weights_sha256"],
         "store_url": store.url, "workers": settings.workers},
        scheduler=settings.scheduler,
        workers=settings.workers,
        chunk_size=settings.chunk_size,
        description=f"segment {dataset.name}",
        progress=progress,
    )
    for failure in run.failed:
        log.warning("segmentation failed for %s: %s", failure["path"], failure["reason"])
    content = {"stage": "segment", "dataset": dataset.name, "store_key": spec.key, "spec": spec.content,
               "policy": spec.content["policy"]["name"], "weights": spec.content["model"]["weights_sha256"],
               "random_init": spec.random_init}
    if externals:
        content["external"] = external_content(externals, store.done)
    return write_stage_outputs(paths.segment_summary, content, run, prepared, store,
                               {"store": store.url, "build_options": spec.build_options})
