"""The source tree keeps its shape: no import circles, the engine's phases import one way, modules stay short.

The import graph is read with :mod:`ast` (no module is imported): every ``import x`` and ``from x import y``
between the project's own modules, at any depth (an import inside a function counts too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "emulator", "schemas")

# Import circles allowed for now: none are left, so any circle fails the test.
KNOWN_CIRCLES: list[set[str]] = []

# The engine's phases, in the order a run goes through them: a module imports only from its own phase
# or an earlier one. The store comes before sending because the live and batch paths write into it.
PHASES = ("tasks.engine.plan", "tasks.engine.store", "tasks.engine.send", "tasks.engine.report")
# Imports against that order, each with its reason.
BACKWARD: set[tuple[str, str]] = set()

MAX_LINES = 400
# Modules over MAX_LINES, each with its reason; the number is today's size (a module may shrink, not grow).
LONG_MODULES = {
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


def test_tasks_do_not_import_the_emulator():
    """The pipeline (the provider layer above all) talks to any OpenAI-compatible server; the emulator only
    stands in for one in tests, the demo and ``gembatch emulator``."""
    found = {
        (m, t) for m, targets in _graph().items() if m.startswith("tasks") for t in targets if t.startswith("emulator")
    }
    assert not found, f"tasks/ imports the emulator: {sorted(found)}"


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
    for package in ("tasks", "flows", "emulator"):  # schemas/: data shapes, declarations not measured
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > LONG_MODULES.get(relative, MAX_LINES):
                too_long[relative] = lines
    assert not too_long, f"modules over {MAX_LINES} lines (or over their allowance in LONG_MODULES): {too_long}"


MAX_FUNCTION_LINES = 60
# Functions over MAX_FUNCTION_LINES, each with its reason; the number is today's length (may shrink, not grow).
LONG_FUNCTIONS = {
    # Command-line output: one table or one option list each, a row a line.
    "flows/options.py:print_plan": 76,
    "flows/cli.py:emulator": 91,
}
MAX_FIELDS = 12
# Classes with more than MAX_FIELDS fields of their own (dataclass fields and self.x assignments).
MANY_FIELDS = {
    # Declarations of options, one field an option: a value object, not a collaborator to split.
    "flows/params.py:CommonOptions": 33,
    "tasks/engine/options.py:RunOptions": 20,
    "emulator/config.py:EmulatorConfig": 43,
    # Counters of one run, each a number the run metadata reports.
    "tasks/engine/send/context.py:RunStats": 18,
}


def _own_fields(cls: ast.ClassDef) -> set[str]:
    """A class's fields: annotated names in its body (not ClassVar) and attributes its methods set on self."""
    own = {
        node.target.id
        for node in cls.body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and "ClassVar" not in ast.unparse(node.annotation)
    }
    for method in (n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(method):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            else:
                continue
            for target in targets:
                for item in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name) and item.value.id == "self":
                        own.add(item.attr)
    return own


def _sizes() -> tuple[dict[str, int], dict[str, int]]:
    """Every function's length in lines and every class's number of own fields, by "path:name"."""
    functions, classes = {}, {}
    for path in _modules().values():
        relative = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions[f"{relative}:{node.name}"] = node.end_lineno - node.lineno + 1
            elif isinstance(node, ast.ClassDef):
                classes[f"{relative}:{node.name}"] = len(_own_fields(node))
    return functions, classes


def test_functions_stay_short_and_classes_small():
    functions, classes = _sizes()
    long = {k: n for k, n in functions.items() if n > LONG_FUNCTIONS.get(k, MAX_FUNCTION_LINES)}
    big = {k: n for k, n in classes.items() if n > MANY_FIELDS.get(k, MAX_FIELDS)}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (or their allowance in LONG_FUNCTIONS): {long}"
    assert not big, f"classes with over {MAX_FIELDS} fields of their own (or their allowance in MANY_FIELDS): {big}"
