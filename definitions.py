"""What `dagster dev -w workspace.yaml` loads: the package's definitions (spur_assets/definitions.py)."""

from spur_assets.definitions import defs

__all__ = ["defs"]
