"""What the per-image stages (segment, features) share: the prepared dataset, work items and the stage summary."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.images import file_sha256, load_image
from medfocus.pipeline.manifest import Entry, read_manifest, write_json
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.provenance import package_versions
from medfocus.pipeline.runner import RunSummary, WorkItem
from medfocus.pipeline.store import canonical_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedDataset:
    name: str
    root: Path
    entries: list[Entry]
    summary: dict

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.summary["classes"]]

    @property
    def prompts(self) -> dict[str, list[str]]:
        return {c["name"]: list(c["prompts"]) for c in self.summary["classes"]}

    def image_path(self, entry: Entry) -> Path:
        path = Path(entry.path)
        if path.is_absolute():
            return path
        base = self.root.parent if self.root.suffix.lower() == ".csv" else self.root
        return (base / path).resolve()

    def work_items(self) -> list[WorkItem]:
        return [WorkItem(entry.hash, str(self.image_path(entry))) for entry in self.entries]

    def unreadable(self) -> list[dict]:
        """Files prepare could not decode, as failure records of the per-image stages (they never reach a store)."""
        return [{"hash": None, "path": item["path"], "reason": f"unreadable, left out by prepare: {item['reason']}"}
                for item in self.summary.get("corrupt", [])]


class ImageChangedError(ValueError):
    """The file no longer has the content its manifest hash names."""


def load_manifest_image(item: WorkItem) -> np.ndarray:
    """Decode a work item's image after checking that the file still holds the content its hash names.

    Results are stored under that hash, so a file rewritten since prepare (with its size and time kept, which hides it
    from prepare's listing check) must fail here rather than file its results under another image's hash.
    """
    digest = file_sha256(item.path)
    if digest != item.hash:
        raise ImageChangedError(
            f"the file changed since `medfocus prepare` (sha256 {digest[:12]}…, the manifest says {item.hash[:12]}…): "
            "run `medfocus prepare` again"
        )
    return load_image(item.path)


def load_prepared(spec: DatasetSpec, params: Params, paths: DatasetPaths, progress: bool = True) -> PreparedDataset:
    """The dataset's manifest, running prepare first when there is none (or it was made from another root)."""
    from .prepare import listing_fingerprint, prepare

    summary = read_json(paths.prepare_summary) if paths.prepare_summary.exists() and paths.manifest.exists() else None
    stale = (
        summary is None
        or Path(summary["root"]) != Path(spec.root)
        or summary.get("params") != params.prepare.model_dump()
        or summary.get("listing") != listing_fingerprint(spec)
    )
    if stale:
        log.info("preparing %s from %s first (no manifest yet, or the files changed)", spec.name, spec.root)
        summary = prepare(spec, params, paths, progress=progress)
    return PreparedDataset(spec.name, Path(summary["root"]), read_manifest(paths.manifest), summary)


_local = threading.local()
# Models a thread keeps: one per stage in a run (a segmenter, an encoder), so that a process running many stages
# with other settings (tests, notebooks) does not pile up models.
MODELS_PER_THREAD = 2


def _thread_models() -> OrderedDict:
    models = getattr(_local, "models", None)
    if models is None:
        models = _local.models = OrderedDict()
    return models


def per_thread_model(key: str, build):
    """One model per worker thread and process: predictors keep per-image state, so threads must not share one.

    The driver builds its model through here too, so work that runs in the driver's thread (the synchronous
    scheduler) uses that model instead of building a second one.
    """
    models = _thread_models()
    if key not in models:
        models[key] = build()
        while len(models) > MODELS_PER_THREAD:
            models.popitem(last=False)
    models.move_to_end(key)
    return models[key]


def check_same_model(built: dict, expected: dict, what: str) -> None:
    """A worker's model must be the driver's (a remote worker may have other packages or weights files)."""
    if canonical_json(built) != canonical_json(expected):
        differing = sorted(k for k in set(built) | set(expected) if built.get(k) != expected.get(k))
        raise RuntimeError(
            f"this worker built another {what} than the driver did (differing: {', '.join(differing)}); give every "
            "worker the same package versions and weights files"
        )


def set_torch_threads(workers: int) -> None:
    """Split the cores this process may use between workers, instead of letting every worker's torch use all of them.

    Never above the threads the process already has: a limit set by its caller (OMP_NUM_THREADS, a test, a cluster's
    worker settings) stands.
    """
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores // max(1, workers))))


def write_stage_summary(path: Path, stage: str, run: RunSummary, unreadable: Iterable[dict] = (), **details) -> dict:
    """The stage's JSON summary; ``unreadable`` files (left out by prepare) count as failed images of the dataset."""
    counts = run.to_dict()
    failed = counts["failed"] + list(unreadable)
    summary = {"stage": stage, **counts, "total": counts["total"] + len(unreadable), "failed": failed,
               "failed_count": len(failed), **details, "versions": package_versions()}
    write_json(path, summary)
    return summary
