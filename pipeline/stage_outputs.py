"""What a per-image stage (segment, features) writes besides its store: a content file and a run file."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from medfocus.pipeline.manifest import write_json
from medfocus.pipeline.provenance import package_versions
from medfocus.pipeline.runner import RunSummary

if TYPE_CHECKING:
    from medfocus.pipeline.preparation import PreparedDataset

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
