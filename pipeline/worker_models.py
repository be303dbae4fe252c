"""Models in dask workers: one per worker thread, checked against the driver's, and each worker's share of the cores."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from medfocus.pipeline.store import canonical_json

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


def shared_segmenter(build_options: dict):
    """The segmenter for resolved options, one per thread (the driver's is reused by work that runs in its thread)."""
    from medfocus.pipeline.segmenters import create_segmenter

    return per_thread_model("segmenter:" + canonical_json(build_options), lambda: create_segmenter(**build_options))
