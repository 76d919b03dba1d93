"""spur-assets installed as a user installs it (`pip install .`, not editable) works from any directory.

A wheel is built from the checkout and installed into a fresh virtual environment; the
dependencies come from the test environment's site-packages through a path file (no
download: this machine is offline), so nothing of the checkout is importable there. `spur run`
then materializes the built-in pipeline (at a tiny size) from an empty directory: the
definitions and the SQL statements must ship inside the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline_expose import TINY  # the pipeline at a tiny size

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_installed_into_a_fresh_venv_runs_the_pipeline_from_an_empty_directory(tmp_path):
    # built from a copy of what the package is made of, so the build leaves nothing in the checkout
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "spur_assets", source / "spur_assets", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (wheel,) = wheels.glob("spur_assets-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())
    # the dependencies, without the test environment's editable spur_assets (its finder is a .pth
    # there, and .pth files are read only in site directories, not in paths a .pth adds)
    (site / "spur-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )

    empty = tmp_path / "somewhere-else"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPUR_", "DAGSTER_", "PYTHON"))}
    env["SPUR_DEVICE"] = "cpu"
    where = subprocess.run(
        [str(python), "-c", "import spur_assets, spur_assets.definitions; print(spur_assets.__file__)"],
        cwd=empty, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed copy, not the checkout

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"ops": {name: {"config": c} for name, c in TINY.items()}}))
    run = subprocess.run(
        [str(venv / "bin" / "spur"), "run", "--config", str(config)],
        cwd=empty, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = empty / ".spur" / "reports" / "latest" / "report.json"
    assert report.is_file() and f"[spur] report: {report}" in run.stdout
    assert "dev -m spur_assets.definitions" in run.stdout
