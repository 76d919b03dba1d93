"""Timing probe for bench/benchmarks/bench_demo.py: times the science-core calls inside a real `spur run`.

Python imports `sitecustomize` at start-up when this folder is on PYTHONPATH. The probe
does nothing unless SPUR_BENCH_PROBE_OUT is set and the process is the `spur` console
script, so the setup script's interpreters and the spawned worker processes run as usual.

In the `spur` process it wraps, right after each `spur_assets.pipeline.*` module is
imported, every module-level name that is a function of `spur_assets.core.*` (what the
Dagster layer calls into the core), plus the public methods of the artifact and lineage
classes, with a timer. Only the outermost timed call counts, so a core function that
writes artifacts is counted once, as core. `spur run` materializes in-process, so every
asset's core work passes through these wrappers. At exit the calls are written as JSON
to SPUR_BENCH_PROBE_OUT. The pipeline code itself is not changed.
"""

from __future__ import annotations

import os
import sys

_OUT = os.environ.get("SPUR_BENCH_PROBE_OUT")

if _OUT and sys.argv and os.path.basename(sys.argv[0]) == "spur":
    import atexit
    import functools
    import importlib.abc
    import importlib.machinery
    import inspect
    import json
    import threading
    import time

    _STARTED = time.time()
    _CALLS: list[dict] = []
    _STATE = threading.local()
    _IO_CLASSES = {"spur_assets.core.records.artifacts": ("ArtifactRef", "ArtifactWriter"), "spur_assets.core.records.lineage": ("LineageStore",)}

    def _category(module: str) -> str:
        if module == "spur_assets.core.records.artifacts":
            return "artifact I/O"
        if module == "spur_assets.core.records.lineage":
            return "lineage"
        if module in ("spur_assets.core.metrics.plots", "spur_assets.core.data.contact_sheet", "spur_assets.core.metrics.report"):
            return "core: figures and report"
        return "core: science"

    def _timed(function, category: str, name: str):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if getattr(_STATE, "inside", False):
                return function(*args, **kwargs)
            _STATE.inside = True
            started, clock = time.time(), time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                _CALLS.append({"category": category, "name": name, "start": started, "seconds": time.perf_counter() - clock})
                _STATE.inside = False

        timed.__spur_bench_probe__ = True
        return timed

    def _instrument(module) -> None:
        name = module.__name__
        if name in _IO_CLASSES:
            for class_name in _IO_CLASSES[name]:
                cls = getattr(module, class_name)
                for attribute, value in list(vars(cls).items()):
                    if inspect.isfunction(value) and (not attribute.startswith("_") or attribute == "__exit__"):
                        setattr(cls, attribute, _timed(value, _category(name), f"{class_name}.{attribute}"))
            return
        for attribute, value in list(vars(module).items()):
            origin = getattr(value, "__module__", "") or ""
            if inspect.isfunction(value) and origin.startswith("spur_assets.core.") and not hasattr(value, "__spur_bench_probe__"):
                setattr(module, attribute, _timed(value, _category(origin), f"{origin}.{value.__name__}"))

    class _AfterImport(importlib.abc.MetaPathFinder):
        """Finds modules as usual, then instruments the ones of interest once they have run."""

        def find_spec(self, fullname, path, target=None):
            if not (fullname.startswith("spur_assets.pipeline.") or fullname in _IO_CLASSES):
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _instrument(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _AfterImport())

    @atexit.register
    def _write() -> None:
        with open(_OUT, "w") as handle:
            json.dump({"process_start": _STARTED, "process_end": time.time(), "argv": sys.argv, "calls": _CALLS}, handle)
