"""Where candidates are scored: in this process, in worker processes, or on Ray actors.

An executor scores ONE generation at a time::

    results = executor.map(scorer, [w_1, ..., w_n])   # in the order given
    # each result: (score_or_result, info_dict) on success, (None, exception) on failure

Workers get the scorer once (a picklable recipe such as :class:`CandidateScorer`, which builds
its model lazily on first call in each worker); per candidate only the band weights travel.
``close()`` shuts pools and a Ray runtime started here down.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import NPSError

Outcome = Tuple[Any, Any]


def _pickled_scorer(scorer: Callable, kind: str, where: str) -> bytes:
    """The scorer as bytes for other processes, or one clear error saying why it cannot travel."""
    try:
        return pickle.dumps(scorer)
    except Exception as exc:  # noqa: BLE001
        raise NPSError(f"executor {kind!r}: the scorer cannot be sent to {where} "
                       f"({type(exc).__name__}: {exc}); use the serial executor") from None


class CandidateError(Exception):
    """A candidate failed inside a worker; carries the worker's error text (always picklable)."""


def _call(scorer: Callable, weights: np.ndarray, rows=None) -> Outcome:
    """``scorer(weights)``, or ``scorer.score_rows(weights, rows)`` when ``rows`` is given
    (racing: the candidate's per-row values on those calibration rows)."""
    t0 = time.perf_counter()
    try:
        w = np.asarray(weights, dtype=np.float64)
        out = scorer(w) if rows is None else scorer.score_rows(w, rows)
    except Exception as exc:  # noqa: BLE001 - every scorer failure is recorded, not raised
        return None, exc
    wall = time.perf_counter() - t0
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        info = dict(out[1])
        info.setdefault("wall_s", wall)
        return out[0], info
    return out, {"wall_s": wall}


def _portable(outcome: Outcome) -> Outcome:
    """Exceptions from workers become CandidateError(text) so they always unpickle."""
    score, info = outcome
    if isinstance(info, BaseException):
        msg = str(info).strip().splitlines()
        text = f"{type(info).__name__}: {msg[0]}" if msg else type(info).__name__
        return None, CandidateError(text)
    return score, info


def _rows_for(weights: Sequence[np.ndarray], rows) -> list:
    """Per item: the calibration row positions to score (None: the scorer's full score)."""
    return [None] * len(weights) if rows is None else [None if r is None else np.asarray(r)
                                                         for r in rows]


class SerialExecutor:
    kind = "serial"
    workers = 1

    def map(self, scorer: Callable, weights: Sequence[np.ndarray], rows=None) -> List[Outcome]:
        """Score each of ``weights`` in order; ``rows`` (one per item, for racing): score only
        those calibration rows, with ``scorer.score_rows``."""
        return [_call(scorer, w, r) for w, r in zip(weights, _rows_for(weights, rows))]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- worker processes ------------------------------------------------------------------------
_WORKER_SCORER = None


WATCHDOG_INTERVAL_S = 0.5


def die_with_parent(parent_pid: int, interval: float = WATCHDOG_INTERVAL_S, *,
                    pdeathsig: bool = True) -> None:
    """Make this (worker) process end when ``parent_pid`` dies, even by ``kill -9``.

    On Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` lets the kernel kill it at once; everywhere a
    daemon thread polls ``os.getppid()`` (a dead parent's children are re-parented) and ends the
    process with ``os._exit``. A parent already gone when this runs ends the worker too.
    (The kernel's signal follows the parent *thread* that started the worker, so ``pdeathsig``
    is only asked for workers started from the parent's main thread.)"""
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)       # PR_SET_PDEATHSIG = 1
        except Exception:  # noqa: BLE001 - no libc/prctl: the watchdog below still works
            pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="nps-parent-watchdog", daemon=True).start()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int, cores: Optional[int] = None) -> int:
    """Torch threads each of ``workers`` processes gets: the usable cores split evenly (at
    least 1), so W workers never run W × cores threads on cores cores."""
    return max(1, (usable_cores() if cores is None else int(cores)) // max(1, int(workers)))


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _limit_threads(threads: int) -> None:
    for var in _THREAD_VARS:          # read by the BLAS/OpenMP runtimes torch starts later
        os.environ[var] = str(threads)
    try:
        torch.set_num_threads(int(threads))
    except ImportError:  # a scorer without torch: the variables are all there is to set
        pass


def _init_worker(scorer_bytes: bytes, parent_pid: Optional[int] = None,
                 pdeathsig: bool = False, threads: Optional[int] = None) -> None:
    global _WORKER_SCORER
    if parent_pid is not None:
        die_with_parent(parent_pid, pdeathsig=pdeathsig)
    if threads is not None:
        _limit_threads(threads)
    _WORKER_SCORER = pickle.loads(scorer_bytes)


def _score_in_worker(weights: np.ndarray, rows=None) -> Outcome:
    return _portable(_call(_WORKER_SCORER, weights, rows))


class ProcessExecutor(SerialExecutor):
    """concurrent.futures.ProcessPoolExecutor ('spawn'); the scorer is unpickled once per worker.

    Workers die with this process (:func:`die_with_parent`): a killed parent leaves no worker
    holding a model in memory. Each worker runs ``threads`` torch threads (default: the usable
    cores split evenly, :func:`threads_per_worker`), so the workers together use the machine's
    cores without oversubscribing them."""

    kind = "processes"

    def __init__(self, workers: Optional[int] = None, threads: Optional[int] = None):
        self.workers = int(workers or usable_cores())
        if self.workers < 1:
            raise NPSError(f"executor: workers must be >= 1, got {workers}")
        self.threads = int(threads) if threads is not None else threads_per_worker(self.workers)
        if self.threads < 1:
            raise NPSError(f"executor: threads must be >= 1, got {threads}")
        self._pool = None
        self._scorer_bytes: Optional[bytes] = None

    def _ensure_pool(self, scorer: Callable) -> None:
        data = _pickled_scorer(scorer, "processes", "worker processes")
        if self._pool is not None and data == self._scorer_bytes:
            return
        self.close()
        main_thread = threading.current_thread() is threading.main_thread()
        self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                         mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(data, os.getpid(), main_thread,
                                                   self.threads))
        self._scorer_bytes = data

    def map(self, scorer: Callable, weights: Sequence[np.ndarray], rows=None) -> List[Outcome]:
        self._ensure_pool(scorer)
        futures = [self._pool.submit(_score_in_worker, np.asarray(w, dtype=np.float64), r)
                   for w, r in zip(weights, _rows_for(weights, rows))]
        out: List[Outcome] = []
        broken = False
        for fut in futures:
            try:
                out.append(fut.result())
            except BrokenProcessPool as exc:
                broken = True
                out.append((None, CandidateError(f"worker process died ({exc})")))
            except Exception as exc:  # noqa: BLE001
                out.append((None, CandidateError(f"{type(exc).__name__}: {exc}")))
        if broken:                    # a worker crashed (killed, out of memory): start afresh
            self.close()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._scorer_bytes = None


# --- ray ----------------------------------------------------------------------------------------
LOOPBACK = "127.0.0.1"


def _import_ray_loopback():
    """Import ray so that a local cluster binds only to 127.0.0.1.

    On Linux ray replaces a node IP of 127.0.0.1 by the machine's external address unless
    "Ray clusters" are disabled (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at import time).
    With them disabled and _node_ip_address=127.0.0.1, the GCS, raylet, object manager, core
    workers, dashboard and runtime-env agents all listen on 127.0.0.1 only."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
    except ImportError:
        raise NPSError("executor 'ray': ray is not installed (pip install 'nps-pruning[ray]')") from None
    try:  # already imported before the variable was set: patch the constant too
        from ray._private import ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = False
    except Exception:  # noqa: BLE001 - a future ray without the constant
        pass
    return ray


class RayExecutor(SerialExecutor):
    """Ray actors, each holding one scorer (built once); only the weights go per call.

    ``ray_address`` joins an existing cluster (ray.init(address=...)); otherwise a local Ray is
    started on loopback only (see :func:`_import_ray_loopback`) and shut down by ``close()``."""

    kind = "ray"

    def __init__(self, workers: Optional[int] = None, ray_address: Optional[str] = None):
        self.ray_address = ray_address
        self.workers = int(workers or os.cpu_count() or 1)
        if self.workers < 1:
            raise NPSError(f"executor: workers must be >= 1, got {workers}")
        self._started_ray = False
        self._actors: list = []
        self._scorer_bytes: Optional[bytes] = None
        self._ray = None

    def _init_ray(self):
        if self._ray is not None:
            return self._ray
        if self.ray_address:
            try:
                import ray
            except ImportError:
                raise NPSError("executor 'ray': ray is not installed") from None
            if not ray.is_initialized():
                ray.init(address=self.ray_address, log_to_driver=False)
                self._started_ray = True
        else:
            ray = _import_ray_loopback()
            if not ray.is_initialized():
                # workers import the scorer's module by name: give them this process's path
                path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
                ray.init(num_cpus=self.workers, include_dashboard=False,
                         dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK,
                         log_to_driver=False, configure_logging=False,
                         runtime_env={"env_vars": {"PYTHONPATH": path,
                                                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}})
                self._started_ray = True
        self._ray = ray
        return ray

    def _ensure_actors(self, scorer: Callable) -> None:
        data = _pickled_scorer(scorer, "ray", "Ray actors")
        if self._actors and data == self._scorer_bytes:
            return
        ray = self._init_ray()
        self._kill_actors()

        @ray.remote(num_cpus=1)
        class _ScorerActor:
            def __init__(self, scorer_bytes: bytes):
                self.scorer = pickle.loads(scorer_bytes)

            def score(self, weights, rows=None):
                return _portable(_call(self.scorer, weights, rows))

        ref = ray.put(data)
        self._actors = [_ScorerActor.remote(ref) for _ in range(self.workers)]
        self._scorer_bytes = data

    def map(self, scorer: Callable, weights: Sequence[np.ndarray], rows=None) -> List[Outcome]:
        self._ensure_actors(scorer)
        from ray.util import ActorPool
        pool = ActorPool(self._actors)
        items = [(np.asarray(w, dtype=np.float64), r)
                 for w, r in zip(weights, _rows_for(weights, rows))]
        out: List[Outcome] = []
        try:
            for res in pool.map(lambda a, item: a.score.remote(*item), items):   # ordered
                out.append(res)
        except Exception as exc:  # noqa: BLE001 - an actor died: fail the rest, restart next time
            text = f"ray actor failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            out.extend((None, CandidateError(text)) for _ in range(len(items) - len(out)))
            self._kill_actors()
        return out

    def _kill_actors(self) -> None:
        if self._ray is not None:
            for a in self._actors:
                try:
                    self._ray.kill(a)
                except Exception:  # noqa: BLE001
                    pass
        self._actors = []
        self._scorer_bytes = None

    def close(self) -> None:
        self._kill_actors()
        if self._ray is not None and self._started_ray:
            self._ray.shutdown()
        self._started_ray = False
        self._ray = None


# The executors by name (``--executor``): each entry is ``factory(workers, ray_address)``.
EXECUTORS: Dict[str, Callable[[Optional[int], Optional[str]], Any]] = {
    "serial": lambda workers, ray_address: SerialExecutor(),
    "processes": lambda workers, ray_address: ProcessExecutor(workers),
    "ray": lambda workers, ray_address: RayExecutor(workers, ray_address),
}
_ALIASES = {None: "serial", "process": "processes"}


def make_executor(kind: str = "serial", *, workers: Optional[int] = None,
                  ray_address: Optional[str] = None):
    """An executor of :data:`EXECUTORS` by name (see the module docstring)."""
    name = _ALIASES.get(kind, kind)
    if name not in EXECUTORS:
        names = list(EXECUTORS)
        choose = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise NPSError(f"unknown executor {kind!r} (choose {choose})")
    return EXECUTORS[name](workers, ray_address)


__all__ = ["make_executor", "EXECUTORS", "SerialExecutor", "ProcessExecutor", "RayExecutor",
           "CandidateError", "usable_cores", "threads_per_worker"]
