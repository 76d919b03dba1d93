"""How many threads a computing process may use, decided in one place.

On a shared machine torch's default (one intra-op thread per core the OS reports) is
wrong twice: a container or `taskset` may grant fewer cores than `os.cpu_count()`, and
image-decoding worker processes started beside the training loop compete with torch's
threads for the same cores. A :class:`ThreadPolicy` holds one number, the threads this
step may keep busy, and splits it between decoding workers and torch intra-op threads.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Environment variables native libraries read for their thread pools when a process starts;
# set for child processes (torchrun ranks, spawned pools) so they start within the policy.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs granted by this process's cgroup quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup quota (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)


@dataclass(frozen=True)
class ThreadPolicy:
    """``total`` threads a step may keep busy, itself and its workers together.

    ``adaptive``: the number was not set by hand, so torch's share follows the cores other
    processes leave free while the step runs (:class:`ThreadGovernor`).
    """

    total: int
    adaptive: bool = False

    @classmethod
    def from_setting(cls, threads: int) -> "ThreadPolicy":
        """``threads`` > 0 as given; 0 (the default) = :func:`available_cpus`, adapted to the load."""
        if threads < 0:
            raise ValueError(f"threads={threads}: give a number of threads >= 1, or 0 for the cores this process may use")
        return cls(threads) if threads > 0 else cls(available_cpus(), adaptive=True)

    def split(self, decoding_workers: int) -> tuple[int, int]:
        """(torch intra-op threads, decoding worker processes) for a step that asks for ``decoding_workers``.

        Workers get at most ``total - 1`` (torch keeps one thread); with a policy of one thread
        decoding moves onto the training thread (0 workers).
        """
        workers = max(0, min(decoding_workers, self.total - 1))
        return self.total - workers, workers

    def pool_size(self, requested: int) -> int:
        """Worker threads or processes for a pool that does the step's whole work (at least 1)."""
        return max(1, min(requested, self.total))


def use_torch_threads(threads: int) -> None:
    """Set torch's intra-op threads (when torch is loaded) and the thread variables child processes inherit."""
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.setNumThreads(threads)


# --------------------------------------------------------------------------- sharing cores with others

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# How often rebalance_threads() measures: long enough for a stable reading, short next to a step.
REBALANCE_SECONDS = 2.0


def _cpu_busy_ticks(cores: frozenset[int], stat: Path = Path("/proc/stat")) -> int | None:
    """Clock ticks the kernel counted as busy on ``cores`` since boot (all processes), or None without /proc."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in rest.split()[:8])
        busy += user + nice + system + irq + softirq + steal
    return busy


def _process_tree_ticks(root: int, proc: Path = Path("/proc")) -> tuple[int, int]:
    """(CPU ticks of process ``root``, CPU ticks of its living descendants), user + system."""
    ticks: dict[int, int] = {}
    parent: dict[int, int] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            fields = (proc / entry.name / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # exited while we looked
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    descendants, todo = 0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        descendants += ticks.get(pid, 0)
        todo.extend(children.get(pid, []))
    return ticks.get(root, 0), descendants


@dataclass
class ThreadGovernor:
    """Keeps torch's intra-op threads within ``ceiling`` and within the cores other processes leave free.

    The policy's number is what a step may use when it has the machine; on a shared machine
    another process may take some of those cores, and torch's threads then wait on each
    other behind it (measured: 2 threads beside one busy process ran at 0.29x of solo, 1
    thread at 0.61x; bench/benchmarks/RESULTS.md section 8). Each :meth:`rebalance` at least
    REBALANCE_SECONDS after the last reads the busy clock ticks of this process's cores
    (/proc/stat) and of its own process tree, and sets torch to the cores left over:
    ``round(cores - others' busy cores - own workers' busy cores)``, between 1 and
    ``ceiling``. Without /proc it does nothing.
    """

    ceiling: int
    cores: frozenset[int] = field(default_factory=lambda: frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset())
    interval_s: float = REBALANCE_SECONDS
    changes: list[tuple[float, int]] = field(default_factory=list)
    _last: tuple[float, int, int, int] | None = None

    def _sample(self) -> tuple[float, int, int, int] | None:
        busy = _cpu_busy_ticks(self.cores)
        if busy is None:
            return None
        own, descendants = _process_tree_ticks(os.getpid())
        return time.monotonic(), busy, own, descendants

    def free_cores(self) -> float | None:
        """Cores left for this process's own threads over the last interval, or None before two samples."""
        sample = self._sample()
        last, self._last = self._last, sample
        if sample is None or last is None or sample[0] <= last[0]:
            return None
        elapsed_ticks = (sample[0] - last[0]) * _CLOCK_TICKS
        others = max(0.0, (sample[1] - last[1]) - (sample[2] - last[2]) - (sample[3] - last[3])) / elapsed_ticks
        workers = max(0.0, sample[3] - last[3]) / elapsed_ticks
        return len(self.cores) - others - workers

    def rebalance(self) -> int | None:
        """Set torch's threads for the cores free now, when the interval has passed; returns the number set, else None."""
        if self._last is not None and time.monotonic() - self._last[0] < self.interval_s:
            return None
        free = self.free_cores()
        if free is None:
            return None
        threads = max(1, min(self.ceiling, round(free)))
        torch = sys.modules.get("torch")
        if torch is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
            self.changes.append((time.monotonic(), threads))
        return threads


_governor: ThreadGovernor | None = None


def govern_torch_threads(ceiling: int | None) -> ThreadGovernor | None:
    """From now on :func:`rebalance_threads` keeps torch within ``ceiling`` and the free cores; None stops that."""
    global _governor
    _governor = ThreadGovernor(ceiling) if ceiling is not None and _CAN_MEASURE else None
    if _governor is not None:
        _governor.rebalance()  # first sample: the next call, an interval later, can decide
    return _governor


def rebalance_threads() -> None:
    """Called between steps of long loops (training, embedding); a no-op unless a governor is on."""
    if _governor is not None:
        _governor.rebalance()


_CAN_MEASURE = Path("/proc/stat").is_file() and hasattr(os, "sched_getaffinity")


# While a helper thread of this process prepares data beside the model (image decoding, caption
# tokenization), the model's thread needs the GIL back between its operators at once: under
# CPython's default 5 ms switch interval it may wait that long each time the helper runs Python.
# 0.2 ms brought the built-in 64-px embedding from 0.77 to 0.85 of the raw forward, the speed
# of embedding already-decoded pixels (bench/benchmarks/RESULTS.md section 2).
HELPER_SWITCH_INTERVAL_S = 0.0002
_switch_lock = threading.Lock()
_switch_holders = 0
_switch_saved = 0.005


@contextlib.contextmanager
def prompt_gil_handover() -> Iterator[None]:
    """Shorten the interpreter's thread switch interval while a data-preparing helper thread runs.

    Re-entrant and safe across threads: the first holder shortens it, the last one restores the
    value it found.
    """
    global _switch_holders, _switch_saved
    with _switch_lock:
        if _switch_holders == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, HELPER_SWITCH_INTERVAL_S))
        _switch_holders += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_holders -= 1
            if _switch_holders == 0:
                sys.setswitchinterval(_switch_saved)
