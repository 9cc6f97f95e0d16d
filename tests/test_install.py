"""Installed like a tool (a wheel in a fresh virtual environment), `gembatch demo` runs from an empty folder.

The wheel carries the demo's samples as flows/demo_data/ (pyproject.toml's force-include of data/). The
fast test checks that mapping against what the demo reads; the slow one builds the wheel with `uv build`,
installs it with `uv pip install` into a new venv and runs the demo there (about 10-20 s, most of it the
install; it needs `uv` and its package cache or index, hence the slow tier).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pyarrow.csv as pcsv
import pytest
from conftest import REPO

JOBS = ("caption", "embed", "extract", "generate", "images", "transcribe", "triage")


def _shipped() -> dict[str, str]:
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())
    return spec["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]


def test_the_wheel_ships_every_sample_the_demo_reads(tmp_path):
    from flows import demo

    shipped = _shipped()
    assert all(target.startswith("flows/demo_data/") for target in shipped.values())
    assert demo.DATA_DIR == REPO / "data"  # in the repository: its data/, nothing copied

    def covered(path: Path) -> bool:
        rel = path.resolve().relative_to(REPO).as_posix()
        return any(rel == src or rel.startswith(src + "/") for src in shipped)

    read = []
    for _command, values in demo._jobs(tmp_path):
        for key in ("input", "prompt_file"):
            if key in values:
                read.append(Path(values[key]))
    for csv in [p for p in read if p.suffix == ".csv"]:
        table = pcsv.read_csv(csv)
        for column in ("image", "audio"):
            if column in table.column_names:
                read += [csv.parent / name for name in table[column].to_pylist()]
    missing = [str(p) for p in read if not covered(p)]
    assert read and missing == [], f"the wheel lacks {missing}"


def test_the_demo_writes_to_gembatch_demo_outside_the_repository(tmp_path, monkeypatch):
    from flows.demo import default_output

    monkeypatch.chdir(REPO)
    assert default_output() == os.path.join("data", "out", "demo")
    monkeypatch.chdir(tmp_path)
    assert default_output() == "gembatch-demo"
    (tmp_path / "data").mkdir()  # a folder with a copy of the samples, as the docs' examples run in
    shutil.copy(REPO / "data" / "corpus.parquet", tmp_path / "data")
    assert default_output() == os.path.join("data", "out", "demo")


@pytest.mark.slow
def test_an_installed_wheel_runs_the_demo_from_an_empty_folder(tmp_path):
    uv = shutil.which("uv")
    assert uv, "uv is not on PATH"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VIRTUAL_ENV", "UV_"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "COLUMNS": "300"}

    def run(*argv: str | Path, cwd: Path = tmp_path) -> subprocess.CompletedProcess:
        result = subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{argv}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    run(uv, "build", "--wheel", "--out-dir", tmp_path / "dist", REPO)
    (wheel,) = (tmp_path / "dist").glob("gembatch-*.whl")
    run(uv, "venv", "--quiet", tmp_path / "venv")
    run(uv, "pip", "install", "--quiet", "--python", tmp_path / "venv", wheel)

    empty = tmp_path / "empty"
    empty.mkdir()
    gembatch = tmp_path / "venv" / "bin" / "gembatch"
    first = run(gembatch, "demo", cwd=empty)
    assert "gembatch-demo/" in first.stdout and "demo_data" in first.stdout  # the samples came with the wheel
    # One folder per job, and the rerouted-model scene's output (it stops before writing a vector).
    assert sorted(p.name for p in (empty / "gembatch-demo").iterdir()) == sorted([*JOBS, "lifecycle-rerouted"])
    assert not list((empty / "gembatch-demo" / "lifecycle-rerouted").glob("part-*.parquet"))
    for job in JOBS:
        assert list((empty / "gembatch-demo" / job / "_runs").glob("*.json")), job
        assert list((empty / "gembatch-demo" / job).glob("part-*.parquet")), job
    assert [p.name for p in empty.iterdir()] == ["gembatch-demo"]  # one folder, named, and nothing else
    second = run(gembatch, "demo", "--output", "elsewhere", cwd=empty)
    assert "elsewhere/" in second.stdout and (empty / "elsewhere" / "embed").is_dir()
