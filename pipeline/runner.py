"""Run a per-image stage once: only images not yet complete in the store, in chunks, on a dask scheduler; and any
list of independent tasks (evaluate's fits) on the same schedulers.

Workers write their results straight into the store (one atomic image at a time) and return only small outcome
records, so nothing large travels back through the scheduler. Schedulers:

- ``synchronous`` — one thread, for debugging and reference runs,
- ``threads`` / ``processes`` — dask's local schedulers with ``workers`` workers,
- ``local-cluster`` or ``local-cluster:N`` — a ``dask.distributed.LocalCluster`` of N worker processes,
- ``tcp://host:port`` (or ``tls://``) — an existing ``dask.distributed`` cluster; its workers need the same
  stores reachable (shared filesystem or an fsspec URL such as ``s3://``).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from tqdm import tqdm


@dataclass(frozen=True)
class WorkItem:
    hash: str
    path: str  # absolute path of the image file


@dataclass
class Outcome:
    hash: str
    path: str
    ok: bool
    reason: str = ""


@dataclass
class RunSummary:
    total: int
    processed: int = 0
    skipped: int = 0
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    scheduler: str = ""

    @property
    def images_per_s(self) -> float:
        return round(self.processed / self.seconds, 3) if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["failed_count"] = len(self.failed)
        data["images_per_s"] = self.images_per_s
        data["seconds"] = round(self.seconds, 3)
        return data


_CLUSTER = re.compile(r"local-cluster(?::(\d+))?$")


@dataclass(frozen=True)
class SchedulerChoice:
    kind: str  # synchronous | threads | processes | local-cluster | address
    workers: int | None = None
    address: str | None = None


def parse_scheduler(value: str, workers: int = 2) -> SchedulerChoice:
    if value in ("synchronous", "threads", "processes"):
        return SchedulerChoice(value, workers)
    match = _CLUSTER.match(value)
    if match:
        return SchedulerChoice("local-cluster", int(match.group(1)) if match.group(1) else workers)
    if re.match(r"^(tcp|tls|inproc|ucx)://\S+$", value):
        return SchedulerChoice("address", address=value)
    raise ValueError(
        f"scheduler {value!r} is not one of synchronous, threads, processes, local-cluster[:N] or a dask address like tcp://host:8786"
    )


ChunkFunction = Callable[[list[WorkItem], dict], list[Outcome]]
TaskFunction = Callable[[Any, dict], list]  # (task, context) -> results; the bar advances by len(results)


def chunked(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_tasks(function: TaskFunction, tasks: list, context: dict, choice: SchedulerChoice, bar: tqdm) -> list:
    """``function(task, context)`` for every task on the chosen scheduler, started in list order as workers free up; the
    results of all tasks in one list (in completion order on a dask.distributed cluster, in task order otherwise)."""
    runner = _run_distributed if choice.kind in ("local-cluster", "address") else _run_local
    return runner(function, tasks, context, choice, bar)


def _run_local(function: TaskFunction, chunks: list, context: dict, choice: SchedulerChoice, bar: tqdm) -> list:
    import dask
    from dask.callbacks import Callback

    class _Progress(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if isinstance(result, list):
                bar.update(len(result))

    # dask's local schedulers start independent tasks in descending key order: keys counting down start them in list
    # order (evaluate lists its longest fits first, so no long fit is left to run alone at the end)
    width = len(str(len(chunks)))
    tasks = [dask.delayed(function, pure=False)(chunk, context, dask_key_name=f"{function.__name__}-{len(chunks) - index:0{width}d}")
             for index, chunk in enumerate(chunks)]
    options = {"scheduler": "sync" if choice.kind == "synchronous" else choice.kind}
    if choice.kind != "synchronous":
        options["num_workers"] = choice.workers
    with _Progress():
        results = dask.compute(*tasks, **options)
    return [outcome for chunk in results for outcome in chunk]


def _run_distributed(function: TaskFunction, chunks: list, context: dict, choice: SchedulerChoice, bar: tqdm) -> list:
    from distributed import Client, LocalCluster, as_completed

    if choice.kind == "local-cluster":
        cluster = LocalCluster(n_workers=choice.workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    else:
        cluster, client = None, Client(choice.address)
    try:
        futures = [client.submit(function, chunk, context=context, pure=False, priority=len(chunks) - index)
                   for index, chunk in enumerate(chunks)]
        outcomes: list = []
        for future in as_completed(futures):
            result = future.result()
            bar.update(len(result))
            outcomes.extend(result)
        return outcomes
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_incremental(
    items: list[WorkItem],
    is_done: Callable[[list[str]], set[str]],
    function: ChunkFunction,
    context: dict,
    *,
    scheduler: str = "threads",
    workers: int = 2,
    chunk_size: int = 8,
    description: str = "images",
    progress: bool = True,
) -> RunSummary:
    """Process the items whose hash ``is_done`` does not report, ``chunk_size`` per task; a failure never stops the run."""
    choice = parse_scheduler(scheduler, workers)
    started = time.perf_counter()
    unique = list({item.hash: item for item in items}.values())
    done = is_done([item.hash for item in unique])
    todo = [item for item in unique if item.hash not in done]
    summary = RunSummary(total=len(unique), skipped=len(unique) - len(todo), scheduler=scheduler)
    if todo:
        chunks = chunked(todo, chunk_size)
        with tqdm(total=len(todo), desc=description, unit="img", disable=not progress, smoothing=0.1) as bar:
            outcomes = run_tasks(function, chunks, context, choice, bar)
        summary.processed = sum(outcome.ok for outcome in outcomes)
        summary.failed = [{"hash": o.hash, "path": o.path, "reason": o.reason} for o in outcomes if not o.ok]
    summary.seconds = time.perf_counter() - started
    return summary
