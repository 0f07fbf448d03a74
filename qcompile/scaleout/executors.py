"""Where repeated work runs: in this process, in local worker processes, or on a Ray cluster.

Passes and tools that run a model many times (sharded calibration, sensitivity analysis, the
accuracy search, many-model builds) hand the work to an ``Executor`` as a module-level function and
a list of items; they never import Ray or multiprocessing themselves. Every executor calls
``function(item, shared, threads)`` once per item and returns the results in item order:

- ``shared`` is sent to each worker once per call, not with every task: through a file each local
  worker reads once, or Ray's object store (``ray.put``). Large models go as a path.
- ``threads`` is the ONNX Runtime intra-op thread count the task should use, so that N workers
  share the machine's cores instead of each taking all of them.
- A worker that dies (killed, out of memory) costs only the tasks in flight, never the results
  already in: they are retried on new workers, each up to ``retries`` times (a local pool restarts
  whole, so every task it was running is charged), then an ``ExecutorError`` names the task. A ``QcompileError`` a task raises is
  the user's to fix, is not retried, and is raised again, as itself, on the caller's side.
"""

from __future__ import annotations

__all__ = ["EXECUTORS", "Executor", "InProcessExecutor", "LocalProcessExecutor", "RayExecutor", "check_machine_bound",
           "machine_limit", "make_executor"]

import abc
import concurrent.futures
import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from qcompile.errors import ConfigError, ExecutorError, QcompileError

logger = logging.getLogger(__name__)

EXECUTORS = ("inprocess", "local", "ray")
DEFAULT_RETRIES = 2

Task = Callable[[Any, Any, int], Any]


# Thread pools a worker's libraries start at import: numpy's BLAS (OpenBLAS, MKL) and OpenMP. A
# worker's ONNX Runtime sessions get ``threads`` intra-op threads; these get the same, or N workers
# each spin a pool as large as the machine (measured: 1.5 cores busy per single-threaded compile).
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _thread_env(threads: int):
    """Set the thread-pool variables while worker processes start (they read them at import)."""
    saved = {name: os.environ.get(name) for name in THREAD_ENV}
    os.environ.update({name: str(threads) for name in THREAD_ENV})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, as containers and taskset set it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# Threads and local worker processes beyond this many per core only cost memory and time (99999
# ONNX Runtime threads grew past 10 GB and hung); more is refused with a clear error.
PER_CORE_LIMIT = 4
# Ray tasks at once run on a cluster, not on this machine; beyond this a number is a typo.
RAY_WORKERS_LIMIT = 65536


def machine_limit() -> int:
    """The most threads or local worker processes a setting may ask for on this machine."""
    return PER_CORE_LIMIT * cpu_count()


def check_machine_bound(key: str, value: int, what: str) -> None:
    """A ConfigError if ``value`` (threads, local workers) is more than this machine can run."""
    if value > machine_limit():
        raise ConfigError(
            f"{key} = {value} is more {what} than this machine can run: it has {cpu_count()} core(s), "
            f"so give at most {machine_limit()} ({PER_CORE_LIMIT} per core), or 0 for the default."
        )


class Executor(abc.ABC):
    """Runs ``function(item, shared, threads)`` for each item; results in item order."""

    name: str
    workers: int

    parallel = True  # work handed over runs beside other work: worth cutting into shards

    def threads_per_task(self, configured: int = 0) -> int:
        """ORT intra-op threads for one task: the configured count, else the cores split among workers."""
        return configured or max(1, cpu_count() // self.workers)

    @abc.abstractmethod
    def map(self, function: Task, items: Sequence[Any], *, shared: Any = None, threads: int = 0,
            retries: int = DEFAULT_RETRIES, what: str = "task") -> list[Any]:
        """``[function(item, shared, threads) for item in items]``, run by this executor's workers."""

    def close(self) -> None:  # noqa: B027  (optional: most executors hold nothing to release)
        """Release the workers (a Ray connection this executor opened is closed)."""

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "workers": self.workers}

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessExecutor(Executor):
    """The default: every task runs here, one after the other."""

    name = "inprocess"
    parallel = False

    def __init__(self) -> None:
        self.workers = 1

    def threads_per_task(self, configured: int = 0) -> int:
        return configured  # 0: ONNX Runtime's default, all cores

    def map(self, function, items, *, shared=None, threads=0, retries=DEFAULT_RETRIES, what="task"):
        return [function(item, shared, threads) for item in items]


# ----- local processes -----

# In a worker process: the shared value of the map call it last ran a task of, loaded once.
_worker_state: dict[str, Any] = {"key": None, "shared": None}


def _init_worker(running_dir: str, threads: int) -> None:
    _worker_state["running_dir"] = running_dir
    _limit_blas_threads(threads)


def _arrive(parties: int) -> None:
    """Warm-up task: wait until every worker has started, so that the pool forks them all at once."""
    try:
        _worker_state["barrier"].wait(timeout=10)
    except threading.BrokenBarrierError:
        pass


def _limit_blas_threads(threads: int) -> None:
    """Resize the OpenBLAS pool numpy loaded (a forked worker inherits the parent's, sized for the
    whole machine, before any variable could say otherwise): what threadpoolctl does, for OpenBLAS."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.split()[-1].lower() and ".so" in line}
    except OSError:
        return
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            setter = getattr(library, symbol, None)
            if setter is not None:
                setter(ctypes.c_int(threads))
                break


def _run_in_worker(function: Task, index: int, item: Any, shared_path: str | None, threads: int):
    # A marker names the task this process is running, so that if the process dies the driver
    # knows which task to charge the retry to.
    marker = Path(_worker_state["running_dir"]) / str(os.getpid())
    marker.write_text(str(index))
    try:
        if _worker_state["key"] != shared_path:
            shared = None
            if shared_path is not None:
                with open(shared_path, "rb") as f:
                    shared = pickle.load(f)
            _worker_state.update(key=shared_path, shared=shared)
        return _outcome(function, item, _worker_state["shared"], threads)
    finally:
        marker.unlink(missing_ok=True)


def _outcome(function: Task, item: Any, shared: Any, threads: int) -> tuple[str, Any]:
    """("ok", result) or ("error", a QcompileError): the user's errors travel back as values."""
    try:
        return "ok", function(item, shared, threads)
    except QcompileError as error:
        return "error", error


def _result(outcome: tuple[str, Any]) -> Any:
    kind, value = outcome
    if kind == "error":
        raise value
    return value


# How local workers start. On Linux all of them are forked when the executor is made, before
# the run's work (a user's metric, ONNX Runtime sessions) has started threads that a fork would
# copy mid-work (an OpenMP pool, as torch's, hangs a forked child): ready in milliseconds with
# qcompile and ONNX Runtime already imported, where spawning costs about a second of imports per
# worker, more than a small model's whole sensitivity analysis. Workers that replace dead ones are
# started by a fork server, which never runs user code. Elsewhere (no fork on Windows; macOS
# frameworks forbid it) they are spawned.
FIRST_START = "fork" if sys.platform == "linux" else "spawn"
RESTART = "forkserver" if sys.platform == "linux" else "spawn"
_PRELOAD = ["qcompile.analysis.candidates", "qcompile.passes.calibration", "qcompile.analysis.sensitivity", "qcompile.scaleout.build"]


class LocalProcessExecutor(Executor):
    """``workers`` processes on this machine, started when it is made (``FIRST_START``) and kept for
    every ``map`` call; each runs ``threads`` ONNX Runtime and BLAS threads (default: its share of
    the cores)."""

    name = "local"

    def __init__(self, workers: int, *, threads: int = 0) -> None:
        if workers < 1:
            raise ConfigError(f"workers = {workers}: give at least 1 worker process.")
        check_machine_bound("workers", workers, "worker processes")
        self.workers = workers
        self.threads = self.threads_per_task(threads)
        self._maps = 0
        self._running = tempfile.TemporaryDirectory(prefix="qcompile-workers-")
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._start(FIRST_START)

    def _start(self, method: str) -> None:
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(_PRELOAD)
        # Workers inherit the thread-pool sizes of a task (spawned ones read them at import).
        with _thread_env(self.threads):
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=context,
                initializer=_init_worker, initargs=(self._running.name, self.threads),
            )
            if method == "fork":
                # A submit forks a worker when none is idle; warm-up tasks that wait for each other
                # keep all busy, so every worker is forked now, from this still-quiet process.
                _worker_state["barrier"] = context.Barrier(self.workers)
                warmups = [self._pool.submit(_arrive, self.workers) for _ in range(self.workers)]
                concurrent.futures.wait(warmups)

    def map(self, function, items, *, shared=None, threads=0, retries=DEFAULT_RETRIES, what="task"):
        items = list(items)
        results: dict[int, Any] = {}
        attempts = [0] * len(items)
        pending = set(range(len(items)))
        # The shared value is pickled once, to a file each worker reads once (the pool outlives the call).
        shared_path = None
        if shared is not None:
            self._maps += 1
            shared_path = os.path.join(self._running.name, f"shared-{self._maps}.pickle")
            with open(shared_path, "wb") as f:
                pickle.dump(shared, f, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            while pending:
                if self._pool is None:
                    self._start(RESTART)
                with _thread_env(self.threads):
                    futures = {self._pool.submit(_run_in_worker, function, index, items[index], shared_path,
                                                 threads or self.threads): index
                               for index in sorted(pending)}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        index = futures[future]
                        results[index] = _result(future.result())
                        pending.discard(index)
                except BrokenProcessPool:
                    lost = self._lost_tasks() or set(pending)
                    self._shutdown()
                    for index in sorted(lost & pending):
                        attempts[index] += 1
                        if attempts[index] > retries:
                            raise ExecutorError(
                                f"A worker process died {attempts[index]} times running {what} {index} "
                                f"({retries} retries). Out of memory? Give fewer --workers, or run with "
                                "--executor inprocess to see the error. From a Python script, call qcompile "
                                "under `if __name__ == '__main__':` (replacement workers import the script)."
                            ) from None
                    logger.warning("a worker process died running %s %s: retrying it on a new worker",
                                   what, ", ".join(str(i) for i in sorted(lost & pending)))
                except QcompileError:
                    # The user's error: the workers are fine. Tasks not started are dropped, running
                    # ones finish, and the pool stays for the next call.
                    for future in futures:
                        future.cancel()
                    concurrent.futures.wait(futures)
                    raise
                except BaseException:
                    self._shutdown()
                    raise
        finally:
            if shared_path is not None:
                os.unlink(shared_path)
        return [results[index] for index in range(len(items))]

    def _lost_tasks(self) -> set[int]:
        """The tasks whose markers a dead pool left: those its processes were running."""
        lost = set()
        for marker in Path(self._running.name).iterdir():
            if not marker.name.isdigit():
                continue  # a shared-value file, not a marker
            try:
                lost.add(int(marker.read_text()))
            except (OSError, ValueError):
                pass
            marker.unlink(missing_ok=True)
        return lost

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        self._shutdown()
        self._running.cleanup()


# ----- Ray -----

def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--executor ray needs Ray, which is not installed here: pip install 'qcompile[ray]' "
            "(or use --executor local --workers N for processes on this machine)."
        ) from None
    return ray


def _ray_task(function: Task, item: Any, shared: Any, threads: int):
    return _outcome(function, item, shared, threads)


class RayExecutor(Executor):
    """Tasks on a Ray cluster: ``address`` as ``ray.init`` takes it ("auto" finds the running
    cluster, "ray://host:10001" a remote one); None starts a local Ray with ``workers`` CPUs.
    A Ray already initialised in this process (``ray.init`` by the caller) is used as it is.

    The shared value goes to the object store once. At most ``workers`` tasks run at once (a
    window over the items); each asks Ray for ``threads`` CPUs, at most the largest node's, so Ray
    runs no more tasks on a node than its cores allow. Ray retries tasks whose worker died.
    """

    name = "ray"

    def __init__(self, workers: int = 0, address: str | None = None) -> None:
        if workers > RAY_WORKERS_LIMIT:
            raise ConfigError(f"workers = {workers}: give at most {RAY_WORKERS_LIMIT} Ray tasks at once.")
        ray = _import_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"address": address, "include_dashboard": False,
                                       "log_to_driver": False, "configure_logging": False}
            if address is None:
                # A Ray of our own, on this machine only: its processes talk over the loopback.
                options.update(num_cpus=workers or cpu_count(), _node_ip_address="127.0.0.1")
            try:
                ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise ConfigError(
                    f"Cannot connect to the Ray cluster at {address!r}: {str(error).rstrip('.')}. Start one with `ray start "
                    "--head`, give its address (--ray-address HOST:6379, or auto), or leave the address out "
                    "for a local Ray."
                ) from None
            self._started = True
        self.address = address
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or cpus

    def _largest_node_cpus(self) -> int:
        nodes = [n for n in self._ray.nodes() if n.get("Alive")]
        return max((int(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=1) or 1

    def threads_per_task(self, configured: int = 0) -> int:
        # A task asking for more CPUs than any node has would wait forever.
        cpus = int(self._ray.cluster_resources().get("CPU", 1))
        return max(1, min(configured or cpus // self.workers, self._largest_node_cpus()))

    def map(self, function, items, *, shared=None, threads=0, retries=DEFAULT_RETRIES, what="task"):
        ray = self._ray
        threads = min(threads, self._largest_node_cpus()) if threads else self.threads_per_task()
        remote = ray.remote(_ray_task).options(
            num_cpus=threads, max_retries=retries,
            runtime_env={"env_vars": {name: str(threads) for name in THREAD_ENV}})
        shared_ref = ray.put(shared)  # once; tasks get it from the object store
        items = list(items)
        refs: dict[Any, int] = {}
        outcomes: dict[int, Any] = {}
        try:
            for index, item in enumerate(items):
                if len(refs) >= self.workers:  # a window of ``workers`` tasks in flight
                    self._collect(refs, outcomes, 1, what)
                refs[remote.remote(function, item, shared_ref, threads)] = index
            self._collect(refs, outcomes, len(refs), what)
            return [outcomes[index] for index in range(len(items))]
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)  # the rest of the map is lost anyway: free the cluster
            raise

    def _collect(self, refs: dict, outcomes: dict, wait_for: int, what: str) -> None:
        """Wait for ``wait_for`` of the tasks in ``refs``; move their results to ``outcomes``."""
        ray = self._ray
        if not refs:
            return
        done, _ = ray.wait(list(refs), num_returns=wait_for)
        for ref in done:
            outcomes[refs.pop(ref)] = self._get(ref, what)

    def _get(self, ref, what: str):
        ray = self._ray
        try:
            return _result(ray.get(ref))
        except ray.exceptions.WorkerCrashedError:
            raise ExecutorError(
                f"A Ray worker died running a {what}, and again when retried. Out of memory? Give fewer "
                "workers, or run with --executor inprocess to see the error."
            ) from None
        except ray.exceptions.RayTaskError as error:
            raise ExecutorError(f"A {what} failed on a Ray worker: {error}") from None
        except ray.exceptions.RayError as error:  # the cluster itself: a dead raylet, a lost node
            raise ExecutorError(
                f"The Ray cluster failed while running a {what}: {type(error).__name__}: {error} Check it "
                f"(`ray status`), restart it, or run with --executor local."
            ) from None

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "workers": self.workers, "address": self.address,
                "cluster_cpus": int(self._ray.cluster_resources().get("CPU", 0))}

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def make_executor(name: str = "inprocess", *, workers: int = 0, address: str | None = None,
                  threads: int = 0) -> Executor:
    """The executor a config names: ``inprocess`` (default), ``local`` (``workers`` processes, default
    the number of cores) or ``ray`` (``address``; None: a local Ray). ``threads``: per task (0: the
    cores divided among the workers)."""
    if name == "inprocess":
        return InProcessExecutor()
    if name == "local":
        return LocalProcessExecutor(workers or cpu_count(), threads=threads)
    if name == "ray":
        return RayExecutor(workers, address)
    raise ConfigError(f"Unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}.")
