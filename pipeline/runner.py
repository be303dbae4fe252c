"""Run a per-image stage once: only images not yet complete in the store, in chunks, on a dask scheduler; and any
list of independent tasks (evaluate's fits) on the same schedulers.

Workers write their results straight into the store (one atomic image at a time) and return only small outcome
records, so nothing large travels back through the scheduler. Schedulers:

- ``synchronous`` — one thread, for debugging and reference runs,
- ``threads`` / ``processes`` — dask's local schedulers with ``workers`` workers,
- ``local-cluster`` or ``local-cluster:N`` — a ``dask.distributed.LocalCluster`` of N worker processes,
- ``tcp://host:port`` (or ``tls://``) — an existing ``dask.distributed`` cluster; its workers need the same
  stores reachable (shared filesystem or an fsspec URL such as ``s3://``).

Worker processes this module starts never outlive the run: SIGTERM, SIGINT or SIGHUP to the driver stops them before
the signal takes its usual course, and a driver killed outright (``kill -9``) takes its ``processes`` workers with it
(Linux: a parent-death signal set in each worker; elsewhere a thread in each worker watching its parent). A
LocalCluster's workers watch their nanny's pipe and exit when the driver dies (dask.distributed does that itself).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Iterator

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
    with contextlib.ExitStack() as stack:
        if choice.kind == "processes":
            options["pool"] = stack.enter_context(_worker_pool(choice.workers))
        with _Progress():
            results = dask.compute(*tasks, **options)
    return [outcome for chunk in results for outcome in chunk]


# ---------------------------------------------------------------------------------------------------- worker lifetime
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


def stop_with_parent(parent_pid: int | None) -> None:
    """Run in each worker process as it starts: the worker dies with the process that started it, even when that one is
    killed with SIGKILL and has no chance to stop it.

    On Linux the kernel sends the worker SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG); checking the parent
    right after setting that closes the race of a parent that died before. Elsewhere a daemon thread polls the parent.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if parent_pid is None:
        return
    if os.getppid() != parent_pid:
        os._exit(1)  # the driver is already gone
    if not armed:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="medfocus-parent-watch", daemon=True).start()


def _stop_children(before: set[int], grace_s: float = 2.0) -> None:
    """Terminate the multiprocessing children started since ``before`` (their pids), then kill those still alive."""
    started = [child for child in multiprocessing.active_children() if child.pid not in before]
    for child in started:
        with contextlib.suppress(Exception):
            child.terminate()
    deadline = time.monotonic() + grace_s
    for child in started:
        with contextlib.suppress(Exception):
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()


@contextlib.contextmanager
def stop_workers_on_signals() -> Iterator[None]:
    """While the block runs, SIGTERM, SIGINT and SIGHUP first stop the worker processes started inside it, then act as
    they would have (the default action, the handler installed before, or KeyboardInterrupt). Signals can only be
    handled in the main thread: elsewhere the block runs unguarded (the workers still die with the process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {child.pid for child in multiprocessing.active_children()}
    previous: dict[int, Any] = {}

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    def on_signal(number: int, frame) -> None:
        try:
            _stop_children(before)
        finally:
            restore()
            handler = previous[number]
            if callable(handler):
                handler(number, frame)
            else:  # SIG_DFL: take the signal's own course (a SIGTERM ends the process with that signal)
                os.kill(os.getpid(), number)

    for number in _STOP_SIGNALS:
        handler = signal.getsignal(number)
        if handler in (signal.SIG_IGN, None):
            continue  # ignored (nohup) or set outside Python: leave it alone
        previous[number] = handler
        signal.signal(number, on_signal)
    try:
        yield
    finally:
        restore()


@contextlib.contextmanager
def _worker_pool(workers: int | None) -> Iterator[Any]:
    """The process pool of the ``processes`` scheduler, as dask would make it, with workers that die with the driver
    and are stopped on SIGTERM, SIGINT or SIGHUP."""
    from concurrent.futures import ProcessPoolExecutor

    from dask.multiprocessing import get_context, initialize_worker_process

    if os.environ.get("PYTHONHASHSEED") in (None, "0"):
        os.environ["PYTHONHASHSEED"] = "6640"  # what dask sets for consistent hashing in its workers
    context = get_context()
    # A forkserver's workers are the server's children, not ours: then only the death signal guards them.
    parent = os.getpid() if getattr(context, "get_start_method", lambda: "spawn")() != "forkserver" else None
    initializer = partial(initialize_worker_process, user_initializer=partial(stop_with_parent, parent))
    before = {child.pid for child in multiprocessing.active_children()}
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=initializer)
    finished = False
    try:
        with stop_workers_on_signals():
            yield pool
        finished = True
    finally:
        if not finished:  # an exception (KeyboardInterrupt included): do not wait for tasks still running
            _stop_children(before)
        pool.shutdown(wait=finished, cancel_futures=True)


def _run_distributed(function: TaskFunction, chunks: list, context: dict, choice: SchedulerChoice, bar: tqdm) -> list:
    from distributed import Client, LocalCluster, as_completed

    with contextlib.ExitStack() as stack:  # closed in reverse: the client, the cluster, then the signal handlers
        if choice.kind == "local-cluster":
            stack.enter_context(stop_workers_on_signals())
            cluster = LocalCluster(n_workers=choice.workers, threads_per_worker=1, processes=True, dashboard_address=None)
            stack.callback(cluster.close)
            client = Client(cluster)
        else:
            client = Client(choice.address)
        stack.callback(client.close)
        futures = [client.submit(function, chunk, context=context, pure=False, priority=len(chunks) - index)
                   for index, chunk in enumerate(chunks)]
        outcomes: list = []
        for future in as_completed(futures):
            result = future.result()
            bar.update(len(result))
            outcomes.extend(result)
        return outcomes


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
