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
    from spur_assets.core.records.lineage import SQL_DIR

    assert (SQL_DIR / "lineage_schema.sql").is_file()
    assert (SQL_DIR / "ancestry_of_materialization.sql").is_file()


# The core's subpackages, lowest first: a subpackage imports only those before it in this order
# (runtime and records need nothing of the science; data needs neither model nor metrics; ...).
LAYERS = ["runtime", "records", "data", "counterfactuals", "model", "metrics"]


def test_core_subpackages_import_only_lower_layers():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        if path.parent == CORE:
            continue
        own = LAYERS.index(path.parent.name)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            for module in modules:
                parts = module.split(".")
                if parts[:2] == ["spur_assets", "core"] and len(parts) > 2 and parts[2] in LAYERS:
                    if LAYERS.index(parts[2]) > own:
                        offenders.append(f"{path.parent.name}/{path.name} imports {module}")
    assert not offenders, offenders
    assert sorted(p.name for p in CORE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


def test_experiments_use_the_cores_public_api_only():
    # bench/experiments/ are research scripts: they build on what the core offers, not on the
    # Dagster layer or on a module's private helpers (which may change without notice).
    experiments = Path(__file__).resolve().parents[1] / "bench" / "experiments"
    offenders = []
    for path in sorted(experiments.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spur_assets"):
                if not node.module.startswith("spur_assets.core"):
                    offenders.append(f"{path.name}: from {node.module}")
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names
                              if a.name.startswith("spur_assets") and not a.name.startswith("spur_assets.core")]
    assert not offenders, offenders
