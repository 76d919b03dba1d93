"""What was made and from what: versioned artifact folders, lineage in DuckDB, ancestry drawings."""
