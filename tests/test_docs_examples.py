"""Every shell and Python example of README.md and docs/ that can run here runs, and shows what it prints.

The convention is in tests/doc_examples.py. All the runnable blocks run in one process (``gembatch``
in-process against the built-in emulator), each page in a fresh folder; each block is then one test,
so a failure names the page and line of the block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import doc_examples as ex
import pytest

ALL = [block for path in ex.pages() for block in ex.blocks(path)]
CHECKED = [b for b in ALL if b.lang in ex.SHELL_LANGS | {"python"}]
RUN = [b for b in CHECKED if b.not_run is None and b.runnable and not b.slow]
RUN_SLOW = [b for b in CHECKED if b.not_run is None and b.runnable and b.slow]


def _run(blocks: list[ex.Block], folder) -> dict[str, list[dict]]:
    (folder / "plan.json").write_text(json.dumps(ex.plan(blocks)), encoding="utf-8")
    env = os.environ | {"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb", "POLARS_TABLE_WIDTH": "100"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, str(ex.REPO / "tests" / "doc_examples.py"), str(folder / "plan.json"), str(folder / "o.json")],
        capture_output=True, text=True, env=env, timeout=600, cwd=ex.REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((folder / "o.json").read_text(encoding="utf-8"))


def _selected(request: pytest.FixtureRequest, blocks: list[ex.Block]) -> list[ex.Block]:
    # Only the pages of the tests pytest selected (-k, a node id): the whole page, its blocks in order.
    # Other modules' parametrised tests are in the session too (the whole suite, or an xdist worker's share).
    params = (getattr(item, "callspec", None) for item in request.session.items)
    chosen = {p.params["block"].page for p in params if p is not None and isinstance(p.params.get("block"), ex.Block)}
    return [b for b in blocks if b.page in chosen]


def _run_once(request: pytest.FixtureRequest, factory: pytest.TempPathFactory, blocks: list[ex.Block], name: str):
    """The blocks' results, run once per pytest run: under pytest-xdist every worker collects (and so selects)
    the same blocks, and the first worker that needs them runs them (15-25 s of CPU) for all the others."""
    if not hasattr(request.config, "workerinput"):
        return _run(blocks, factory.mktemp(name))
    import fcntl
    import hashlib

    key = hashlib.sha256("\n".join(b.id for b in blocks).encode()).hexdigest()[:16]
    folder = factory.getbasetemp().parent / f"{name}-{key}"
    folder.mkdir(exist_ok=True)
    with (folder / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker runs them; the others wait, then read what it wrote
        done = folder / "results.json"
        if not done.exists():
            results = _run(blocks, folder)
            done.write_text(json.dumps(results), encoding="utf-8")
        return json.loads(done.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    return _run_once(request, tmp_path_factory, _selected(request, RUN), "doc-examples")


@pytest.fixture(scope="module")
def slow_results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    return _run_once(request, tmp_path_factory, _selected(request, RUN_SLOW), "doc-examples-slow")


@pytest.mark.parametrize("block", CHECKED, ids=[b.id for b in CHECKED])
def test_every_example_runs_or_says_why_not(block: ex.Block):
    assert block.not_run is not None or block.runnable, (
        f"{block.id}: a {block.lang} block that is neither runnable (`$ ` commands) nor marked <!-- not-run: REASON -->"
    )


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_example(block: ex.Block, results: dict[str, list[dict]]):
    _check(block, results)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_SLOW, ids=[b.id for b in RUN_SLOW])
def test_slow_example(block: ex.Block, slow_results: dict[str, list[dict]]):
    _check(block, slow_results)


def _check(block: ex.Block, results: dict[str, list[dict]]) -> None:
    steps = ex.steps(block)
    done = results[block.id]
    for i, (step, result) in enumerate(zip(steps, done, strict=True)):
        shown = "\n".join(step.expected)
        followed_by_exit = i + 1 < len(steps) and steps[i + 1].kind == "exit"
        if step.kind != "exit" and not followed_by_exit:
            assert result["code"] == 0, f"{block.id}: `{step.source}` exited {result['code']}:\n{result['printed']}"
        missing = ex.missing_lines(step.expected, result["printed"])
        assert not missing, (
            f"{block.id}: `{step.source}` did not print these shown lines:\n" + "\n".join(missing)
            + f"\n--- it printed:\n{result['printed']}\n--- the page shows:\n{shown}"
        )  # fmt: skip


def test_the_readme_runs_the_demo():
    readme = [b for b in RUN if b.page == "README.md"]
    assert any(s.kind == "gembatch" and s.source.startswith("demo") for b in readme for s in ex.steps(b))


def test_the_tutorial_shows_nightly_embed_as_deployments_yaml_declares_it():
    import yaml

    (block,) = [b for b in ex.blocks(ex.REPO / "docs" / "tutorial.md") if b.lang == "yaml"]
    (shown,) = yaml.safe_load(block.text)
    spec = yaml.safe_load((ex.REPO / "deployments.yaml").read_text(encoding="utf-8"))
    (declared,) = [d for d in spec["deployments"] if d["name"] == shown["name"]]
    assert shown == declared, "docs/tutorial.md's deployment differs from deployments.yaml's: copy it again"
