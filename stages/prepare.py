"""The prepare stage: dataset folder -> ``cache/<dataset>/manifest.csv``, ``splits.json`` and the ``prepare.json`` summary
(the work is ``medfocus.pipeline.preparation``; later stages prepare through it too when the files changed)."""

from __future__ import annotations

from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.manifest import dropped_images
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.preparation import prepare_dataset


def prepare(spec: DatasetSpec, params: Params, paths: DatasetPaths, progress: bool = True, rehash: bool = False) -> dict:
    """Build the manifest, splits and summary of ``spec``; returns the summary written to prepare.json. ``rehash``
    reads and hashes every file, even those whose path, size, times and inode say they are unchanged."""
    return prepare_dataset(spec, params, paths, progress=progress, rehash=rehash)


def overview(summary: dict, paths: DatasetPaths) -> dict:
    """What ``medfocus prepare`` prints: the counts, what was left out and why, where the summary is."""
    keys = ("dataset", "images", "counts", "corrupt_count", "duplicate_groups", "duplicate_files_removed", "leaked_train_test",
            "near_duplicate_groups", "near_duplicate_files_removed", "near_duplicate_leaks", "near_duplicate_label_conflicts",
            "warnings")
    return {k: summary[k] for k in keys} | {"corrupt": [c["path"] for c in summary["corrupt"]],
                                            "leaked": [p for leak in summary["leaks"] for p in leak["removed_from_train"]],
                                            # every image left out, per reason: a count and a few paths
                                            "dropped": dropped_images(summary),
                                            "summary": str(paths.prepare_summary)}
