"""Typed resources: where things live and which device computes."""


import os
from pathlib import Path

import dagster as dg

from spur_assets.core.records.lineage import LineageStore
from spur_assets.core.runtime.threads import ThreadPolicy


class SpurSettings(dg.ConfigurableResource):
    """The configuration names of docs/data-contract.md#configuration; each can be overridden by run config.

    Built from the environment by :func:`settings_from_environment`.
    """

    home: str = ".spur"  # SPUR_HOME: everything is written under it
    dataset: str = ""  # SPUR_DATASET: a dataset.yaml; empty = the built-in dataset
    base_model: str = ""  # SPUR_BASE_MODEL: save_pretrained folder or hub id; empty = train a small CLIP
    inbox: str = ""  # SPUR_INBOX: folder the sensor watches for new batches
    device: str = "auto"  # SPUR_DEVICE: auto = CUDA, then MPS, then CPU
    # SPUR_ALLOWED_ROOTS: folders (os.pathsep-separated) a batch may read from besides its own
    # folder, e.g. a shared COCO copy; empty = each batch reads only inside its own folder.
    allowed_roots: str = ""
    # SPUR_THREADS: threads a step may keep busy, its decoding workers included; 0 = the cores this
    # process may use (CPU affinity and cgroup quota), not os.cpu_count().
    threads: int = 0

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve()

    @property
    def inbox_path(self) -> Path:
        return Path(self.inbox).expanduser().resolve() if self.inbox else self.home_path / "inbox"

    @property
    def allowed_root_paths(self) -> tuple[Path, ...]:
        return tuple(Path(root).expanduser().resolve() for root in self.allowed_roots.split(os.pathsep) if root.strip())

    def thread_policy(self) -> ThreadPolicy:
        return ThreadPolicy.from_setting(self.threads)

    def lineage(self) -> LineageStore:
        return LineageStore(self.home_path)


def settings_from_environment(environ: dict[str, str] | None = None) -> SpurSettings:
    """SpurSettings from SPUR_HOME / SPUR_DATASET / SPUR_BASE_MODEL / SPUR_INBOX / SPUR_DEVICE / SPUR_ALLOWED_ROOTS / SPUR_THREADS."""
    env = os.environ if environ is None else environ
    home = Path(env.get("SPUR_HOME") or ".spur").expanduser().resolve()
    return SpurSettings(
        home=str(home),
        dataset=env.get("SPUR_DATASET", ""),
        base_model=env.get("SPUR_BASE_MODEL", ""),
        inbox=env.get("SPUR_INBOX") or str(home / "inbox"),
        device=env.get("SPUR_DEVICE", "auto"),
        allowed_roots=env.get("SPUR_ALLOWED_ROOTS", ""),
        threads=int(env.get("SPUR_THREADS") or 0),
    )
