"""The examples of README.md and docs/: which fenced blocks run, how, and what their shown output must match.

The convention (docs/how-to/run-the-tests.md links here; tests/test_docs_examples.py runs it):

* A ```` ```console ```` or ```` ```bash ```` block whose lines start with ``$ `` is a shell session:
  each ``$ `` line is a command (a line ending with ``\\`` goes on on the next), and the lines after it,
  up to the next ``$ ``, are what it prints. ``gembatch …`` (with or without ``uv run``) runs in-process
  in one runner process; ``gembatch … &`` (a server: the emulator) runs in a process of its own until
  the page ends, a port it names (``--port 8931``) replaced by a free one throughout the page;
  ``export NAME=VALUE`` sets a variable for the rest of the page; ``echo $?`` checks the exit code of
  the command before it; anything else runs in ``bash``. A command that exits non-zero must be
  followed by ``echo $?``.
* A ```` ```python ```` block is run. Lines starting with ``>>> `` / ``... `` are statements whose values
  are printed (as in the interpreter), and the lines between them are what they print; a block without
  prompts only has to run without an error.
* What is shown is checked line by line: every shown line must appear in what the command printed
  (tables are compared cell by cell, so column widths don't matter). Lines that hold what changes from
  run to run are not compared: run ids, times, loopback ports, timings (``duration (s)``, ``rows/s``).
  A line ``…`` stands for lines left out.
* A block preceded by ``<!-- run: width=N -->`` runs on a terminal N columns wide (80 otherwise).
* A block preceded by ``<!-- run: slow -->`` runs in the slow tier only (``uv run pytest -m slow``): a
  Python flow call, which starts Prefect's temporary server (tens of seconds).
* A block preceded by ``<!-- not-run: REASON -->`` is not run (a real key, a Prefect server, Kubernetes,
  minutes of benchmark). A shell or Python block that is neither runnable nor marked fails the test.
* Every page runs in a fresh folder of its own holding a copy of ``data/`` (no ``data/out/``), its blocks
  in page order (a later block may read an earlier one's output); ``/tmp/`` in a command or a Python
  block means that folder. ``--provider local`` everywhere: the built-in emulator, no key, no network.

``uv run python tests/doc_examples.py --update docs/how-to/embed.md`` runs a page's examples and writes what
they print into the page, where it shows an output whole (review the diff). ``python tests/doc_examples.py
PLAN.json RESULTS.json`` is the runner: it runs the blocks of a plan (made
by :func:`plan`) and writes what each command printed and its exit code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHELL_LANGS = {"bash", "console", "sh", "shell"}
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->")
SLOW = re.compile(r"<!--\s*run:\s*slow\s*-->")
WIDTH = re.compile(r"<!--\s*run:\s*width=(\d+)\s*-->")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+)(?P<lang>[\w-]*)[^\n]*$")

# Lines holding what changes from run to run are not compared.
VOLATILE = [
    re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}"),  # run ids
    re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d"),  # times
    re.compile(r"127\.0\.0\.1:\d+"),  # the emulator's port
    re.compile(r"batches/[0-9a-f]{8,}"),  # batch ids
    re.compile(r"^\s*[│|]\s*(duration \(s\)|rows/s)\s*[│|]"),  # timings
    re.compile(r"\(pid \d+\)"),
    # Costs follow the date: a price may change on a day (gemini-3.8-flash doubles on 2027-01-01).
    re.compile(r"^\s*[│|]\s*(estimated cost \(USD\)|input cost USD|output cost USD|image cost USD|price)\b"),
]


@dataclass
class Block:
    page: str  # path relative to the repository
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    not_run: str | None = None  # the reason, when marked
    slow: bool = False  # marked <!-- run: slow -->: run by the slow tier (pytest -m slow) only
    width: int = 80  # the terminal's columns (<!-- run: width=N --> for a wide table)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def runnable(self) -> bool:
        if self.lang in SHELL_LANGS:
            return any(line.startswith("$ ") for line in self.text.splitlines())
        return self.lang == "python"


@dataclass
class Step:
    kind: str  # "gembatch", "background", "export", "shell", "exit", "python"
    source: str
    expected: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)  # the command's lines as the page writes them


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of one Markdown page, with their not-run marks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        body = "\n".join(line[indent:] for line in lines[i + 1 : j])
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = NOT_RUN.search(lines[k]) if k >= 0 else None
        slow = bool(SLOW.search(lines[k])) if k >= 0 else False
        width = WIDTH.search(lines[k]) if k >= 0 else None
        page = str(path.relative_to(REPO))
        out.append(
            Block(
                page, i + 1, match["lang"].lower(), body, mark.group(1) if mark else None, slow,
                int(width.group(1)) if width else 80,
            )
        )  # fmt: skip
        i = j + 1
    return out


def steps(block: Block) -> list[Step]:
    """A runnable block as its commands (or statements), each with the lines it is shown to print."""
    result: list[Step] = []
    lines = block.text.splitlines()
    if block.lang == "python":
        if not any(line.startswith(">>> ") for line in lines):
            return [Step("python", block.text, raw=lines)]
        for line in lines:
            if line.startswith(">>> ") or line == ">>>":
                result.append(Step("python", line[4:], raw=[line]))
            elif line.startswith("... ") or line == "...":
                result[-1].source += "\n" + line[4:]
                result[-1].raw.append(line)
            elif result:
                result[-1].expected.append(line)
        return result
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            command, raw = line[2:], [line]
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1].rstrip() + " " + lines[i].strip()
                raw.append(lines[i])
            words = shlex.split(command)
            if words[:2] == ["uv", "run"]:
                words = words[2:]
            if command.strip() == "echo $?":
                result.append(Step("exit", command, raw=raw))
            elif words and words[0] == "export" and len(words) == 2 and "=" in words[1]:
                result.append(Step("export", words[1], raw=raw))
            elif words and words[0] == "gembatch" and words[-1] == "&":
                result.append(Step("background", shlex.join(words[1:-1]), raw=raw))
            elif words and words[0] == "gembatch":
                result.append(Step("gembatch", shlex.join(words[1:]), raw=raw))
            else:
                result.append(Step("shell", command, raw=raw))
        elif result:
            result[-1].expected.append(line)
        i += 1
    return result


def normalise(line: str) -> str:
    """A line as compared: table cells stripped of padding, runs of spaces as one."""
    line = line.rstrip()
    if any(c in line for c in "│┃┆"):
        cells = [" ".join(c.split()) for c in re.split(r"[│┃┆]", line)]
        return "|".join(cells).strip("|")
    return " ".join(line.split())


def compared(expected: list[str]) -> list[str]:
    """The shown lines that are checked: not blank, not borders, not an elision, nothing volatile."""
    out = []
    for line in expected:
        if not re.search(r"\w", line) or line.strip() in {"…", "..."}:
            continue
        if any(v.search(line) for v in VOLATILE):
            continue
        out.append(normalise(line))
    return out


def missing_lines(expected: list[str], printed: str) -> list[str]:
    """The shown lines (as compared) that the printed output does not hold."""
    got = {normalise(line) for line in printed.splitlines()}
    return [line for line in compared(expected) if line not in got]


def plan(selected: list[Block]) -> list[dict]:
    """Pages in order, each with its runnable blocks' steps: what the runner process is given."""
    by_page: dict[str, list[dict]] = {}
    for block in selected:
        by_page.setdefault(block.page, []).append(
            {"id": block.id, "width": block.width, "steps": [asdict(s) for s in steps(block)]}
        )
    return [{"page": page, "blocks": items} for page, items in by_page.items()]


# -- the runner process ---------------------------------------------------------------------------


def _gembatch(args: str) -> tuple[int, str]:
    from flows.cli import main

    out = io.StringIO()
    argv = sys.argv
    sys.argv = ["gembatch", *shlex.split(args)]
    code_ = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                main()
            except SystemExit as exc:
                code_ = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code_, out.getvalue()


def _python(source: str, namespace: dict, interactive: bool) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            compiled = compile(source, "<doc example>", "single" if interactive else "exec")
            exec(compiled, namespace)
        except Exception:  # noqa: BLE001 - the example's error is the result
            import traceback

            traceback.print_exc()
            return 1, out.getvalue()
    return 0, out.getvalue()


def _set_width(columns: int) -> None:
    from flows.options import console, err_console

    console.width = err_console.width = columns


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: str, work: str) -> tuple[subprocess.Popen, str]:
    """``gembatch … &``: a server of its own, until the page ends; what it printed until it listens."""
    import threading
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import main; main()", *shlex.split(args)],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not any("listening on" in x for x in lines):
        time.sleep(0.1)
    time.sleep(0.2)  # the server is up once it says so
    return proc, "".join(lines)


def run_plan(items: list[dict]) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    home = os.getcwd()
    for page in items:
        work = tempfile.mkdtemp(prefix="d", dir="/tmp")
        shutil.copytree(REPO / "data", Path(work) / "data", ignore=shutil.ignore_patterns("out", "__pycache__"))
        os.chdir(work)
        namespace: dict = {"__name__": "__doc_example__"}
        last_code = 0
        environ = dict(os.environ)
        servers: list[subprocess.Popen] = []
        # A port the page names (`--port 8123`) becomes a free one, in every command of the page; what the
        # commands print shows the page's number again.
        named = {int(p) for b in page["blocks"] for st in b["steps"] for p in re.findall(r"--port (\d+)", st["source"])}
        ports = {doc: _free_port() for doc in named}
        try:
            for block in page["blocks"]:
                done = []
                _set_width(block.get("width", 80))
                interactive = any(s["kind"] == "python" for s in block["steps"]) and len(block["steps"]) > 1
                for step in block["steps"]:
                    source = step["source"].replace("/tmp/", work + "/")
                    for doc, real in ports.items():
                        source = re.sub(rf"(--port |:){doc}\b", rf"\g<1>{real}", source)
                    if step["kind"] == "exit":
                        code_, printed = 0, f"{last_code}\n"
                    elif step["kind"] == "export":
                        name, _, value = source.partition("=")
                        os.environ[name] = value
                        code_, printed = 0, ""
                    elif step["kind"] == "background":
                        server, printed = _start(source, work)
                        servers.append(server)
                        code_ = 0 if server.poll() is None else server.returncode
                    elif step["kind"] == "gembatch":
                        code_, printed = _gembatch(source)
                    elif step["kind"] == "python":
                        code_, printed = _python(source, namespace, interactive or bool(step["expected"]))
                    else:
                        proc = subprocess.run(
                            ["bash", "-c", source], capture_output=True, text=True, cwd=work, timeout=120
                        )
                        code_, printed = proc.returncode, proc.stdout + proc.stderr
                    for doc, real in ports.items():
                        printed = re.sub(rf":{real}\b", f":{doc}", printed)
                    last_code = code_
                    done.append({"code": code_, "printed": printed.replace(work + "/", "/tmp/")})
                results[block["id"]] = done
        finally:
            for server in servers:
                server.terminate()
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.kill()
            os.environ.clear()
            os.environ.update(environ)
            os.chdir(home)
            shutil.rmtree(work, ignore_errors=True)
    return results


# -- rewriting a page's shown output ---------------------------------------------------------------

UNTRACKED_NOTE = "note: no Prefect API is configured"


def updated_text(block: Block, done: list[dict]) -> tuple[str, list[str]]:
    """The block with each step's shown output replaced by what it printed, and the shown lines still
    missing. An output shown whole is replaced whole; in an elided one (a ``…`` line), a table row is
    replaced by the printed row with the same first cell, and any other line is left for a person."""
    out: list[str] = []
    left: list[str] = []
    for step, result in zip(steps(block), done, strict=True):
        out += step.raw
        if step.kind == "python" and not step.raw[0].startswith(">>>"):
            continue  # a plain Python block shows no output
        printed = [line.rstrip() for line in result["printed"].splitlines() if not line.startswith(UNTRACKED_NOTE)]
        if any(line.strip() in {"…", "..."} for line in step.expected):
            got = {normalise(line) for line in printed}
            by_key = {normalise(line).split("|")[0]: line for line in printed if any(c in line for c in "│┃┆")}
            for line in step.expected:
                checked = compared([line])
                if not checked or checked[0] in got:
                    out.append(line)
                elif any(c in line for c in "│┃┆") and checked[0].split("|")[0] in by_key:
                    out.append(by_key[checked[0].split("|")[0]])
                else:
                    out.append(line)
                    left.append(f"{block.id}: {line.strip()}")
            continue
        while printed and not printed[-1]:
            printed.pop()
        out += printed
    return "\n".join(out), left


def update(page_names: list[str]) -> None:
    """``python tests/doc_examples.py --update [PAGE…]``: run the pages' blocks (every page's, without a
    PAGE) and write what they print into the pages (review the diff: timings and run ids change)."""
    if not page_names:
        page_names = [str(p.relative_to(REPO)) for p in pages()]
    chosen = [b for p in pages() for b in blocks(p) if b.page in page_names and b.runnable and not b.not_run]
    results = run_plan(plan(chosen))
    left: list[str] = []
    for name in sorted({b.page for b in chosen}):
        path = REPO / name
        lines = path.read_text(encoding="utf-8").split("\n")
        for block in sorted((b for b in chosen if b.page == name), key=lambda b: -b.line):
            indent = len(lines[block.line - 1]) - len(lines[block.line - 1].lstrip())
            text, missing = updated_text(block, results[block.id])
            new = text.split("\n")
            left += missing
            body = [(" " * indent + line) if line else line for line in new]
            end = block.line + len(block.text.split("\n"))
            lines[block.line : end] = body
        path.write_text("\n".join(lines), encoding="utf-8")
        print(f"{name}: updated")
    if left:
        print("Shown lines that are no longer printed, to fix by hand:", *left, sep="\n  ")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1] == "--update":
        # As the tests run them: untracked, in a Prefect home of their own, 80 columns.
        os.environ.pop("PREFECT_API_URL", None)
        os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="gembatch-prefect-")
        os.environ["COLUMNS"] = "80"
        # Plain text even from a terminal: no colours, and polars' tables as wide as through a pipe.
        os.environ.update(NO_COLOR="1", TERM="dumb", POLARS_TABLE_WIDTH="100")
        update(sys.argv[2:])
        sys.exit(0)
    plan_file, results_file = sys.argv[1:3]
    Path(results_file).write_text(json.dumps(run_plan(json.loads(Path(plan_file).read_text()))), encoding="utf-8")
