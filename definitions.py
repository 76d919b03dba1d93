"""Assembles the spur-assets Dagster definitions; `dagster dev -w workspace.yaml` loads this file."""

import dagster as dg

from spur_assets.pipeline.expose import spurious_features
from spur_assets.pipeline.ingest import raw_pairs
from spur_assets.pipeline.refs_io_manager import ArtifactRefIOManager
from spur_assets.pipeline.resources import settings_from_environment

settings = settings_from_environment()

defs = dg.Definitions(
    assets=[raw_pairs, spurious_features],
    resources={
        "settings": settings,
        "refs": ArtifactRefIOManager(settings=settings),
    },
)
