"""The `gembatch` command's start-up: what it imports, and tracked (Prefect API) versus untracked runs."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TEST_KEY, TEST_KEY_ENV, assert_balanced, read_output, write_corpus
from test_embed import DEFAULT, assert_vectors_match

from flows import commands

JOBS = ("embed", "extract", "caption", "transcribe", "images", "generate")
HEAVY = ("prefect", "polars", "pyarrow", "openai", "numpy", "PIL", "fsspec", "emulator")
NOTE = "note: no Prefect API is configured"

# Runs `gembatch` commands in one fresh interpreter, then reports exit codes, each command's stdout and
# every module that was imported.
PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from flows.cli import main
    results = []
    for argv in json.loads(sys.argv[1]):
        sys.argv = ["gembatch", *argv]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code
        results.append({"code": code, "stdout": out.getvalue()})
    print(json.dumps({"results": results, "modules": sorted(sys.modules)}))
    """
)


def probe(argvs: list[list[str]], *, cwd: Path, env: dict[str, str] | None = None) -> tuple[list[dict], set[str], str]:
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argvs)], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    return report["results"], set(report["modules"]), result.stderr


def _untracked_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


def option_names(command) -> list[str]:
    """Every --option (and -o) a command declares, read from its signature as typer reads it."""
    names = []
    for param in inspect.signature(command).parameters.values():
        for meta in getattr(param.annotation, "__metadata__", ()):
            decls = [getattr(meta, "default", None), *(getattr(meta, "param_decls", None) or ())]
            names += [d for d in decls if isinstance(d, str) and d.startswith("-")]
    return names


def test_help_imports_no_prefect_and_no_job_module_yet_lists_every_option(tmp_path):
    results, modules, _ = probe([["--help"], *([job, "--help"] for job in JOBS)], cwd=tmp_path)
    assert [r["code"] for r in results] == [0] * (1 + len(JOBS))
    assert all(job in results[0]["stdout"] for job in (*JOBS, "demo", "models", "emulator"))
    for job, result in zip(JOBS, results[1:], strict=True):
        names = option_names(getattr(commands, job))
        assert "--max-cost-usd" in names and "--no-progress" in names and "--output" in names
        missing = [n for n in names if n not in result["stdout"]]
        assert missing == [], f"gembatch {job} --help lacks {missing}"
    imported = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert imported == [], f"--help imported {imported[:10]}…"
    assert {m for m in modules if m.startswith(("flows.", "tasks."))} == {
        "flows.cli", "flows.commands", "flows.options", "flows.params", "tasks.defaults", "tasks.errors",
    }  # fmt: skip


def test_every_flow_parameter_is_an_option_of_its_command_with_the_same_default():
    from flows.caption import caption_flow
    from flows.embed import embed_flow
    from flows.extract import extract_flow
    from flows.generate import generate_flow
    from flows.images import images_flow
    from flows.params import CommonOptions
    from flows.transcribe import transcribe_flow

    flows = dict(
        zip(JOBS, (embed_flow, extract_flow, caption_flow, transcribe_flow, images_flow, generate_flow), strict=True)
    )
    for job, flow in flows.items():
        command = getattr(commands, job)
        assert command.flow == f"{flow.fn.__module__}:{flow.fn.__name__}"
        of_flow = {p.name: p.default for p in inspect.signature(flow.fn).parameters.values() if p.name != "options"}
        of_flow |= {name: field.default for name, field in CommonOptions.model_fields.items()}  # the flow's options
        of_command = {p.name: p.default for p in inspect.signature(command).parameters.values()}
        of_command["progress"] = of_command.pop("no_progress")
        assert sorted(of_flow) == sorted(of_command), job
        differing = {
            k: (of_flow[k], of_command[k])
            for k in of_flow
            if k != "progress" and of_command[k] is not inspect.Parameter.empty and of_flow[k] != of_command[k]
        }
        assert differing == {}, f"{job}: defaults differ (flow, command): {differing}"


def test_a_dry_run_a_model_list_and_refused_runs_import_no_prefect(tmp_path):
    src = write_corpus(tmp_path / "in.parquet", [1, 2, 3], ["one", "two", "three"])
    env = {k: v for k, v in _untracked_env().items() if k != "GEMINI_API_KEY"}
    out = str(tmp_path / "out")
    results, modules, stderr = probe(
        [
            ["embed", str(src), "-o", out, "--dry-run"],
            ["embed", str(src), "-o", out],  # GEMINI_API_KEY not set
            ["embed", str(src), "-o", out, "--provider", "local", "--text-col", "body"],
            ["embed", "missing.parquet", "-o", out, "--provider", "local"],  # relative: cwd is tmp_path
            ["models", "--provider", "local"],
        ],
        cwd=tmp_path,
        env=env,
    )
    assert [r["code"] for r in results] == [0, 2, 2, 2, 0], stderr
    assert "rows to send" in results[0]["stdout"] and "gemini-embedding-001" in results[4]["stdout"]
    assert "error: GEMINI_API_KEY is not set" in stderr and "has no column 'body'" in stderr
    assert "missing.parquet does not exist" in stderr
    assert NOTE not in stderr  # nothing was run
    assert not [m for m in modules if m.split(".")[0] == "prefect"]
    assert not (tmp_path / "out").exists()


def _embed_cli(src: Path, out: Path, base_url: str) -> list[str]:
    return [
        sys.executable, "-X", "importtime", "-m", "flows.cli", "embed", str(src), "--output", str(out),
        "--base-url", base_url, "--api-key-env", TEST_KEY_ENV, "--chunk-size", "4", "--batch-size", "3",
        "--no-progress",
    ]  # fmt: skip


def _imported(stderr: str) -> set[str]:
    """Module names from `python -X importtime` lines."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def _run_doc(out: Path) -> dict:
    (path,) = (out / "_runs").glob("*.json")
    return json.loads(path.read_text())


TEXTS = {i: f"command line sentence {i}" for i in range(10)}


def test_without_a_prefect_api_a_run_is_untracked_says_so_and_writes_the_same_outputs(emulator, tmp_path):
    src = write_corpus(tmp_path / "in.parquet", list(TEXTS), list(TEXTS.values()))
    out = tmp_path / "out"
    env = {**_untracked_env(), TEST_KEY_ENV: TEST_KEY}
    result = subprocess.run(
        _embed_cli(src, out, emulator.base_url), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith(NOTE)]
    assert len(notes) == 1, result.stderr
    assert "prefect server start" in notes[0] and "PREFECT_API_URL=" in notes[0]
    assert not [m for m in _imported(result.stderr) if m.split(".")[0] == "prefect"]
    assert "Run metadata:" in result.stdout

    assert_vectors_match(read_output(out), TEXTS, model=DEFAULT)
    doc = _run_doc(out)
    assert doc["flow_run_id"] is None and doc["status"] == "completed"
    assert doc["counts"]["succeeded"] == len(TEXTS) and doc["requests"]["sent"] == 5  # chunks of 4, 4, 2; ≤ 3 a request
    assert doc["parameters"]["model"] == DEFAULT and "progress" not in doc["parameters"]
    assert_balanced(doc)


@pytest.fixture
def api_url(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_with_a_prefect_api_a_run_is_a_flow_run_and_writes_what_an_untracked_run_writes(api_url, emulator, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    from flows.events import run_title

    src = write_corpus(tmp_path / "in.parquet", list(TEXTS), list(TEXTS.values()))
    docs, tables = {}, {}
    for mode, extra in (("tracked", {"PREFECT_API_URL": api_url}), ("untracked", {})):
        out = tmp_path / mode
        env = {**_untracked_env(), TEST_KEY_ENV: TEST_KEY, **extra}
        result = subprocess.run(
            _embed_cli(src, out, emulator.base_url), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
        assert (NOTE in result.stderr) == (mode == "untracked")
        docs[mode], tables[mode] = _run_doc(out), read_output(out).sort("id")

    tracked, untracked = docs["tracked"], docs["untracked"]
    assert tables["tracked"].equals(tables["untracked"])
    assert_vectors_match(tables["tracked"], TEXTS, model=DEFAULT)
    assert sorted(tracked) == sorted(untracked)  # the same metadata fields…
    for key in ("status", "message", "job", "counts", "job_parameters", "input", "tokens", "cost"):
        assert tracked[key] == untracked[key], key
    assert tracked["requests"]["sent"] == untracked["requests"]["sent"]
    unchanged = {k: v for k, v in tracked["parameters"].items() if k != "output"}
    assert unchanged == {k: v for k, v in untracked["parameters"].items() if k != "output"}
    assert untracked["flow_run_id"] is None and tracked["flow_run_id"]  # …but only one is a flow run

    async def flow_run_and_tasks():
        async with get_client() as client:
            flow_run = await client.read_flow_run(tracked["flow_run_id"])
            flow = await client.read_flow(flow_run.flow_id)
            task_runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
            )
            logs = await client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])), sort=LogSort.TIMESTAMP_ASC
            )
            return flow_run, flow, task_runs, logs

    flow_run, flow, task_runs, logs = asyncio.run(flow_run_and_tasks())
    assert flow.name == "gembatch-embed" and flow_run.state.is_completed()
    # Named after its work from its first log line on, not "winged-moth" first and renamed later.
    title = run_title("embed", str(src), str(tmp_path / "tracked"))
    assert flow_run.name == title
    assert logs and logs[0].message == f"Beginning flow run {title!r} for flow 'gembatch-embed'"
    assert flow_run.parameters["input"] == str(src)
    assert sorted(t.name for t in task_runs) == ["chunk-0", "chunk-1", "chunk-2"]


SETTINGS_PROBE = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from flows.tracking import configured_api_url
    from prefect.settings import Settings

    root = Path(sys.argv[1])
    out = []
    for i, case in enumerate(json.loads(sys.argv[2])):
        folder = root / f"case{i}"
        folder.mkdir()
        for name, text in case["files"].items():
            path = folder / name
            path.write_text(text)
            os.utime(path, (1_000_000 + i, 1_000_000 + i))  # Prefect caches toml files by path and mtime
        os.chdir(folder)
        saved = dict(os.environ)
        os.environ["PREFECT_HOME"] = str(folder)
        os.environ.update(case["env"])
        try:
            out.append([configured_api_url(), Settings().api.url or None])
        finally:
            os.environ.clear()
            os.environ.update(saved)
    print(json.dumps(out))
    """
)


def test_the_prefect_api_is_found_where_prefect_finds_it(tmp_path):
    profiles = (
        'active = "work"\n[profiles.work]\nPREFECT_API_URL = "http://profile/api"\n'
        '[profiles.plain]\nPREFECT_LOGGING_LEVEL = "INFO"\n'
    )
    cases = [
        ({}, {}, None),
        ({"PREFECT_API_URL": "http://env/api"}, {}, "http://env/api"),
        ({}, {"profiles.toml": profiles}, "http://profile/api"),
        ({"PREFECT_PROFILE": "plain"}, {"profiles.toml": profiles}, None),
        ({"PREFECT_PROFILE": "nope"}, {"profiles.toml": profiles}, None),
        ({"PREFECT_API_URL": ""}, {"profiles.toml": profiles}, None),
        ({}, {".env": "PREFECT_API_URL=http://dotenv/api\n", "profiles.toml": profiles}, "http://dotenv/api"),
        ({}, {"prefect.toml": '[api]\nurl = "http://toml/api"\n'}, "http://toml/api"),
        ({}, {"pyproject.toml": '[tool.prefect.api]\nurl = "http://pyproject/api"\n'}, "http://pyproject/api"),
        (
            {},
            {"prefect.toml": '[api]\nurl = "http://toml/api"\n', "pyproject.toml": '[tool.prefect.api]\nurl = "x"\n'},
            "http://toml/api",
        ),
        ({"PREFECT_API_URL": "http://env/api"}, {".env": "PREFECT_API_URL=http://dotenv/api\n"}, "http://env/api"),
        ({}, {"prefect.toml": 'profiles_path = "elsewhere.toml"\n', "elsewhere.toml": profiles}, "http://profile/api"),
        ({"PREFECT_PROFILES_PATH": "elsewhere.toml"}, {"elsewhere.toml": profiles}, "http://profile/api"),
        ({"PREFECT_TEST_MODE": "1"}, {"profiles.toml": profiles}, None),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    payload = json.dumps([{"env": e, "files": f} for e, f, _ in cases])
    result = subprocess.run(
        [sys.executable, "-c", SETTINGS_PROBE, str(tmp_path), payload],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout.splitlines()[-1])
    for (env_vars, files, want), (ours, prefects) in zip(cases, answers, strict=True):
        assert ours == prefects == want, (env_vars, sorted(files), ours, prefects)
