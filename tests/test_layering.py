"""The science core stays free of Dagster (docs/contributing.md#two-layers: two layers, data flows down once)."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "spur_assets" / "core"


def test_core_never_imports_dagster():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0].startswith("dagster")]
    assert not offenders, offenders


def test_every_sql_statement_is_a_file_in_sql_dir():
    from spur_assets.core.lineage import SQL_DIR

    assert (SQL_DIR / "lineage_schema.sql").is_file()
    assert (SQL_DIR / "ancestry_of_materialization.sql").is_file()
