"""The Dagster layer: assets, checks, sensors and resources. Thin; logic lives in core."""
