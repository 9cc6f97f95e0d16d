"""The source tree keeps its shape: no import circles, the engine's phases import one way, modules stay short.

The import graph is read with :mod:`ast` (no module is imported): every ``import x`` and ``from x import y``
between the project's own modules, at any depth (an import inside a function counts too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "emulator", "schemas")

# Circles that exist today outside tasks/ and are being taken apart; a new one fails the test.
KNOWN_CIRCLES = [
    {"emulator.batches", "emulator.server"},
    {
        "flows.cli",
        "flows.commands",
        "flows.common",
        "flows.demo",
        "flows.docgen",
        "flows.options",
        "flows.params",
        "flows.shards",
    },
]

# The engine's phases, in the order a run goes through them: a module imports only from its own phase
# or an earlier one. The store comes before sending because the live and batch paths write into it.
PHASES = ("tasks.engine.plan", "tasks.engine.store", "tasks.engine.send", "tasks.engine.report")
# Imports against that order, each with its reason.
BACKWARD: set[tuple[str, str]] = set()

MAX_LINES = 400
# Modules over MAX_LINES, each with its reason; the number is today's size (a module may shrink, not grow).
LONG_MODULES = {
    # The live path's fan-out, retries and part writing (planning is in plan/rows.py, the shared values in
    # job.py and send/context.py); _send and process_chunk are still long functions.
    "tasks/engine/send/chunk.py": 480,
    # Not yet split: BatchRun's submit pass and its re-attach/poll loop share the claims bookkeeping.
    "tasks/engine/send/batch/batch_run.py": 860,
    # One run from start to finish; run_job not yet cut into phase functions.
    "tasks/engine/run.py": 815,
    # Parts, compaction, error rows and the scan: one OutputStore whose methods share its file helpers.
    "tasks/engine/store/output.py": 580,
    # The Prefect-concurrency-limit quota: one protocol (lease, renew, give back) that reads best whole
    # (its daily-quota stop is daily_quota.py).
    "tasks/engine/send/shared_limits.py": 730,
    # The done-key index: one flat-memory structure and its queries.
    "tasks/engine/plan/index.py": 650,
    "tasks/engine/plan/claims.py": 440,
    "tasks/engine/send/limits.py": 450,
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(component)
    return circles


def _phase(module: str) -> int | None:
    for rank, phase in enumerate(PHASES):
        if module == phase or module.startswith(phase + "."):
            return rank
    return None


def test_no_import_circles():
    new = [c for c in _circles(_graph()) if not any(c <= known for known in KNOWN_CIRCLES)]
    assert not new, f"import circles: {[sorted(c) for c in new]}"


def test_no_circles_in_tasks():
    circles = [c for c in _circles(_graph()) if any(m.startswith("tasks") for m in c)]
    assert not circles, f"import circles in tasks/: {[sorted(c) for c in circles]}"


def test_engine_phases_import_one_way():
    backward = set()
    for module, targets in _graph().items():
        own = _phase(module)
        if own is None:
            continue
        for target in targets:
            theirs = _phase(target)
            if theirs is not None and theirs > own:
                backward.add((module, target))
    assert backward <= BACKWARD, f"imports against the phase order {PHASES}: {sorted(backward - BACKWARD)}"


def test_modules_stay_short():
    too_long = {}
    for package in ("tasks/engine",):  # tasks/jobs/ and tasks/provider/: not measured yet
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > LONG_MODULES.get(relative, MAX_LINES):
                too_long[relative] = lines
    assert not too_long, f"modules over {MAX_LINES} lines (or over their allowance in LONG_MODULES): {too_long}"
