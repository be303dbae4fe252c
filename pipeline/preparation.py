"""What the per-image stages (segment, features) share: the prepared dataset, work items and the stage summary."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from medfocus.pipeline.config import ConfigError, Params, PrepareParams
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
    """The dataset's manifest. Which test split and subsets a dataset has is decided by ``medfocus prepare`` alone.

    - No manifest yet: prepare first, with params.yaml's ``prepare`` section.
    - The manifest is out of date (image files added, removed or rewritten, another root, other class definitions):
      prepare again, logged, with the settings the manifest was made with, so that an explicit
      ``medfocus prepare --test-fraction 0.3`` keeps its split.
    - params.yaml's ``prepare`` section differs from the manifest's settings: the manifest is used as it is, and a
      warning names the differing keys and the ``medfocus prepare`` command that applies params.yaml.
    """
    from .prepare import listing_fingerprint, prepare

    if not (paths.prepare_summary.exists() and paths.manifest.exists()):
        log.info("preparing %s from %s first (no manifest yet)", spec.name, spec.root)
        summary = prepare(spec, params, paths, progress=progress)
        return PreparedDataset(spec.name, Path(summary["root"]), read_manifest(paths.manifest), summary)

    summary = read_json(paths.prepare_summary)
    prepared_with = _prepared_settings(summary, paths)
    out_of_date = _why_out_of_date(summary, spec, listing_fingerprint(spec))
    if out_of_date:
        log.info("preparing %s from %s again (%s), with the settings of its last prepare", spec.name, spec.root, out_of_date)
        summary = prepare(spec, params.model_copy(update={"prepare": prepared_with}), paths, progress=progress)
    else:
        differing = {key: (getattr(prepared_with, key), getattr(params.prepare, key))
                     for key in PrepareParams.model_fields if getattr(prepared_with, key) != getattr(params.prepare, key)}
        if differing:
            log.warning(
                "%s was prepared with %s, the params say %s; using it as prepared. To prepare it with the params: "
                "medfocus prepare --dataset %s --root %s", paths.prepare_summary,
                ", ".join(f"prepare.{key}={made!r}" for key, (made, _) in differing.items()),
                ", ".join(f"{wanted!r}" for _, wanted in differing.values()), spec.name, spec.root,
            )
    return PreparedDataset(spec.name, Path(summary["root"]), read_manifest(paths.manifest), summary)


def _prepared_settings(summary: dict, paths: DatasetPaths) -> PrepareParams:
    """The prepare settings a manifest was made with; settings added to medfocus since then take their defaults."""
    recorded = {key: value for key, value in summary.get("params", {}).items() if key in PrepareParams.model_fields}
    try:
        return PrepareParams.model_validate(recorded)
    except ValidationError as error:
        raise ConfigError(
            f"{paths.prepare_summary}: its prepare settings are no longer valid ({error.errors()[0]['msg']}); "
            f"run `medfocus prepare --dataset {summary.get('dataset', paths.dataset)}` again"
        ) from None


def _why_out_of_date(summary: dict, spec: DatasetSpec, listing: str) -> str:
    """Why a manifest no longer describes the dataset's files and classes, or '' when it still does."""
    if Path(summary["root"]).resolve() != Path(spec.root).resolve():
        return f"it was made from {summary['root']}"
    if summary.get("listing") != listing:
        return "image files were added, removed or changed"
    # Ad-hoc datasets take their classes from the folders, which the listing covers; defined ones carry their prompts.
    if spec.classes and summary.get("classes") != json.loads(json.dumps([asdict(c) for c in spec.classes])):
        return "its class definitions (names, folders or prompts) changed"
    return ""


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


def run_file(content_file: Path) -> Path:
    """``segment.json`` -> ``segment.run.json``: how a run went (timings, scheduler, where the store is)."""
    return content_file.with_name(content_file.stem + ".run.json")


def done_digest(hashes: Iterable[str]) -> str:
    """One hash of the set of images a store holds: changes exactly when an image is added or lost."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()[:16]


def write_stage_outputs(content_file: Path, content: dict, run: RunSummary, prepared: PreparedDataset, store,
                        run_details: dict) -> dict:
    """Write a per-image stage's two outputs; return them merged (what the command prints).

    ``content_file`` holds what the store contains for this dataset (the spec, images done, failures with reasons,
    files prepare could not read): later stages and DVC depend on it, so it changes only when content does.
    ``run_file(content_file)`` holds how this run went: counts of processed and skipped images, seconds, versions.
    """
    counts = run.to_dict()
    failed = counts["failed"] + prepared.unreadable()
    done = store.done([entry.hash for entry in prepared.entries])
    summary = {**content, "total": len(prepared.entries) + len(prepared.unreadable()), "done": len(done),
               "done_digest": done_digest(done), "failed": failed, "failed_count": len(failed)}
    write_json(content_file, summary)
    run_summary = {key: counts[key] for key in ("processed", "skipped", "seconds", "images_per_s", "scheduler")}
    run_summary |= {**run_details, "versions": package_versions()}
    write_json(run_file(content_file), run_summary)
    return summary | run_summary
