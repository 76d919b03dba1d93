"""Hands ArtifactRefs from asset to asset as JSON files, never pickles.

Tables, images and checkpoints stay where their asset wrote them; what travels
is a small JSON pointer (paths, hashes, the materialization id) kept at
``SPUR_HOME/refs/<asset>/<partition or _>.json``.
"""


import os
from pathlib import Path

import dagster as dg

from spur_assets.core.records.artifacts import UNPARTITIONED, ArtifactRef
from spur_assets.pipeline.resources import SpurSettings


class ArtifactRefIOManager(dg.ConfigurableIOManager):
    """Stores each asset's ArtifactRef as JSON; a partitioned upstream loads as {partition: ref}."""

    settings: SpurSettings

    @property
    def home(self) -> Path:
        return self.settings.home_path

    def _pointer(self, asset_key: dg.AssetKey, partition: str) -> Path:
        return self.home / "refs" / asset_key.to_user_string() / f"{partition or UNPARTITIONED}.json"

    def handle_output(self, context: dg.OutputContext, obj: ArtifactRef) -> None:
        if not isinstance(obj, ArtifactRef):
            raise TypeError(f"{context.asset_key.to_user_string()} must return an ArtifactRef, got {type(obj).__name__}")
        partition = context.asset_partition_key if context.has_asset_partitions else ""
        pointer = self._pointer(context.asset_key, partition)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        staged = pointer.with_name(f".{pointer.name}.{os.getpid()}.tmp")
        staged.write_text(obj.to_json())
        os.replace(staged, pointer)

    def load_input(self, context: dg.InputContext) -> ArtifactRef | dict[str, ArtifactRef]:
        asset = context.asset_key
        if not context.has_asset_partitions:
            pointer = self._pointer(asset, "")
            if not pointer.is_file():
                raise FileNotFoundError(
                    f"{asset.to_user_string()} has not been materialized under {self.home}; materialize it first"
                )
            return ArtifactRef.from_json(pointer.read_text())
        refs: dict[str, ArtifactRef] = {}
        missing: list[str] = []
        for partition in context.asset_partition_keys:
            pointer = self._pointer(asset, partition)
            if pointer.is_file():
                refs[partition] = ArtifactRef.from_json(pointer.read_text())
            else:
                missing.append(partition)
        if missing:
            context.log.warning(
                f"{asset.to_user_string()}: partitions never materialized successfully, left out: {', '.join(missing)}"
            )
        if not refs:
            raise FileNotFoundError(
                f"no partition of {asset.to_user_string()} has been materialized under {self.home}; "
                "materialize a batch first (spur run, or the UI)"
            )
        return refs
