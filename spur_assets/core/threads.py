"""How many threads a computing process may use, decided in one place.

On a shared machine torch's default (one intra-op thread per core the OS reports) is
wrong twice: a container or `taskset` may grant fewer cores than `os.cpu_count()`, and
image-decoding worker processes started beside the training loop compete with torch's
threads for the same cores. A :class:`ThreadPolicy` holds one number, the threads this
step may keep busy, and splits it between decoding workers and torch intra-op threads.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
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
    """``total`` threads a step may keep busy, itself and its workers together."""

    total: int

    @classmethod
    def from_setting(cls, threads: int) -> "ThreadPolicy":
        """``threads`` > 0 as given; 0 (the default) = :func:`available_cpus`."""
        if threads < 0:
            raise ValueError(f"threads={threads}: give a number of threads >= 1, or 0 for the cores this process may use")
        return cls(threads if threads > 0 else available_cpus())

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
