"""Process pools that stop at once when their caller stops.

``concurrent.futures.ProcessPoolExecutor`` used as a context manager waits, on the way
out, for every task already submitted: a run stopped by SIGTERM during a counterfactual
pool would keep rendering for minutes. :func:`process_pool` cancels what has not
started and terminates the workers instead, whenever the with-block raises (a stop,
a failed task); a block that ends normally shuts the pool down as usual.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any


@contextmanager
def process_pool(max_workers: int, **options: Any) -> Iterator[ProcessPoolExecutor]:
    """A spawn-context ProcessPoolExecutor (``options`` as its keywords) that ends its workers on any exception."""
    options.setdefault("mp_context", multiprocessing.get_context("spawn"))
    pool = ProcessPoolExecutor(max_workers=max_workers, **options)
    try:
        yield pool
    except BaseException:
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(timeout=5)
        raise
    pool.shutdown(wait=True)
