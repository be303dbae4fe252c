"""What the per-image stages (segment, features) share: the prepared dataset, work items and the stage summary."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.manifest import Entry, read_manifest, write_json
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.provenance import package_versions
from medfocus.pipeline.runner import RunSummary, WorkItem

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


def per_thread_model(key: str, build):
    """One model per worker thread and process: predictors keep per-image state, so threads must not share one."""
    models = getattr(_local, "models", None)
    if models is None:
        models = _local.models = {}
    if key not in models:
        models[key] = build()
    return models[key]


def set_torch_threads(workers: int) -> None:
    """Split the cores between workers instead of letting every worker's torch use all of them."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


def write_stage_summary(path: Path, stage: str, run: RunSummary, **details) -> dict:
    summary = {"stage": stage, **run.to_dict(), **details, "versions": package_versions()}
    write_json(path, summary)
    return summary
