"""One materialization = staged artifacts + a lineage row + a Dagster Output.

Every asset body runs inside :func:`recorded_materialization`: it writes through
the session's :class:`ArtifactWriter`, and on success the artifacts are
committed atomically, the lineage row and edges are journalled into DuckDB, and
``session.output(...)`` builds the Dagster Output with the data version.
"""


import hashlib
import json
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import dagster as dg

from spur_assets import __version__
from spur_assets.core.records.artifacts import ArtifactRef, ArtifactWriter, data_version_of
from spur_assets.core.records.lineage import LineageEdge, MaterializationRecord, new_materialization_id
from spur_assets.core.runtime.threads import ThreadGovernor, ThreadPolicy, govern_torch_threads, use_torch_threads
from spur_assets.pipeline.recovery import tag_run_with_this_process
from spur_assets.pipeline.resources import SpurSettings


def config_hash(config: Any) -> str:
    """sha256 of the canonical JSON of a dg.Config, a dict, or None."""
    if config is None:
        raw: Any = {}
    elif isinstance(config, dg.Config):
        raw = config.model_dump()
    else:
        raw = config
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def upstream_refs(*inputs: ArtifactRef | Mapping[str, ArtifactRef] | None) -> list[ArtifactRef]:
    """Flatten what the IO manager loaded (a ref, or {partition: ref}) into a list of refs."""
    refs: list[ArtifactRef] = []
    for item in inputs:
        if item is None:
            continue
        if isinstance(item, ArtifactRef):
            refs.append(item)
        else:
            refs.extend(item[k] for k in sorted(item))
    return refs


def reset_peak_memory() -> bool:
    """Start a new peak-memory window for this process (Linux: the VmHWM high-water mark).

    `spur run` and the tests materialize every step in one process, so the process's lifetime
    peak would carry one step's memory into the next step's figure. Writing 5 to
    /proc/self/clear_refs resets the high-water mark to the current RSS (Linux >= 4.0).
    Returns False where that is not possible (other systems, restricted /proc).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_metadata() -> dict[str, float]:
    """Peak resident memory of this step (MiB): the process's, and its largest finished child's.

    On Linux the process figure is VmHWM since `reset_peak_memory` (called when the
    materialization started), i.e. this step's own peak even when several steps share a
    process; elsewhere getrusage's lifetime peak. The child figure (image-decoding workers) is
    getrusage's largest child of the process so far. On CUDA, also the step's peak GPU memory
    held by torch's allocator.
    """
    import resource

    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                own = int(line.split()[1]) / 1024
    except OSError:
        pass
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale
    peaks = {"peak_rss_mb": round(own, 1), "peak_rss_largest_child_mb": round(children, 1)}
    torch = sys.modules.get("torch")  # only when this step used torch; never imported here for it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class MaterializationSession:
    writer: ArtifactWriter
    materialization_id: str
    inputs: list[ArtifactRef]
    device: str
    policy: ThreadPolicy = field(default_factory=lambda: ThreadPolicy(1))
    started: float = field(default_factory=time.monotonic)
    ref: ArtifactRef | None = None
    lineage_recorded: bool = False
    thread_split: tuple[int, int] = (1, 0)
    governor: ThreadGovernor | None = None

    def decoding_workers(self, requested: int) -> int:
        """Split the step's threads for ``requested`` decoding processes beside torch; returns the workers to start.

        torch keeps the rest of the policy's threads (settings.threads), so the step never keeps
        more threads busy than the policy allows.
        """
        torch_threads, workers = self.policy.split(requested)
        use_torch_threads(torch_threads)
        self.thread_split = (torch_threads, workers)
        self._govern(torch_threads)
        return workers

    def _govern(self, torch_threads: int) -> None:
        if self.policy.adaptive:
            self.governor = govern_torch_threads(torch_threads)

    def _threads_metadata(self) -> str:
        torch_threads, workers = self.thread_split
        text = f"{self.policy.total} (torch {torch_threads}, decoding workers {workers})"
        if self.governor is not None and self.governor.changes:
            lowest = min(threads for _, threads in self.governor.changes)
            text += f"; torch threads changed {len(self.governor.changes)} times for other processes' load (lowest {lowest})"
        return text

    def output(self, metadata: Mapping[str, Any] | None = None) -> dg.Output:
        """The Dagster Output for this materialization (call after the with-block)."""
        if self.ref is None:
            raise RuntimeError("output() called before the materialization was committed")
        base = {
            "materialization_id": self.ref.materialization_id,
            "data_version": self.ref.data_version,
            "rows": sum(o.rows for o in self.ref.outputs if o.kind == "table"),
            "artifact_dir": dg.MetadataValue.path(str(self.writer.final_dir)),
            "device": self.device,
            "threads": self._threads_metadata(),
            "seconds": round(time.monotonic() - self.started, 2),
            **peak_memory_metadata(),
            "lineage_recorded": self.lineage_recorded,
            "upstream": dg.MetadataValue.json(
                [{"asset": r.asset, "partition": r.partition, "materialization_id": r.materialization_id} for r in self.inputs]
            ),
        }
        with warnings.catch_warnings():
            # data_version on Output is marked beta; it is what makes staleness follow content.
            warnings.simplefilter("ignore", category=dg.BetaWarning)
            return dg.Output(
                self.ref,
                data_version=dg.DataVersion(self.ref.data_version),
                metadata={**base, **dict(metadata or {})},
            )


@contextmanager
def recorded_materialization(
    context: dg.AssetExecutionContext,
    settings: SpurSettings,
    config: Any = None,
    inputs: Iterable[ArtifactRef] = (),
    device: str = "cpu",
) -> Iterator[MaterializationSession]:
    """Stage outputs, then commit them and record lineage; nothing is recorded on failure."""
    asset = context.asset_key.to_user_string()
    partition = context.partition_key if context.has_partition_key else ""
    asset_code_version = context.assets_def.code_versions_by_key.get(context.asset_key) or "0"
    materialization_id = new_materialization_id()
    started_at = _utcnow()
    inputs = list(inputs)
    tag_run_with_this_process(context)  # so a run whose process dies is found and failed (recovery.py)
    with ArtifactWriter(settings.home_path, asset, partition, materialization_id) as writer:
        policy = settings.thread_policy()
        # Every step starts within the thread policy; a step that starts decoding workers splits it.
        use_torch_threads(policy.total)
        session = MaterializationSession(writer, materialization_id, inputs, device, policy, thread_split=(policy.total, 0))
        session._govern(policy.total)
        reset_peak_memory()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        try:
            yield session
        finally:
            govern_torch_threads(None)  # the next step starts from its own policy
        outputs = writer.commit()
    data_version = data_version_of(outputs)
    record = MaterializationRecord(
        materialization_id=materialization_id,
        asset=asset,
        partition=partition,
        run_id=context.run.run_id,
        code_version=f"{asset}@{asset_code_version}+spur-assets-{__version__}",
        config_hash=config_hash(config),
        data_version=data_version,
        device=device,
        started_at=started_at,
        ended_at=_utcnow(),
        rows=sum(o.rows for o in outputs if o.kind == "table"),
        outputs=tuple(outputs),
        edges=tuple(
            LineageEdge(r.materialization_id, r.asset, r.partition, r.data_version) for r in inputs
        ),
    )
    session.lineage_recorded = settings.lineage().record(record)
    if not session.lineage_recorded:
        context.log.warning(
            f"lineage database stayed locked; {asset} row journalled and applied by the next sync"
        )
    session.ref = ArtifactRef(asset, partition, materialization_id, data_version, tuple(outputs))
