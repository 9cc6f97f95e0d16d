"""The docs site builds with `mkdocs build --strict`: a broken link or anchor, or a page left out of the nav,
fails it (mkdocs.yml's `validation`). CI runs the same build; this test catches it in `uv run pytest` too."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_the_site_builds_strict(tmp_path):
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists()


# Pages other work adds; they are linked from the README already. Empty this set once they exist.
PENDING: set[str] = set()


def test_the_readme_links_to_pages_that_exist():
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = {m.split("#")[0] for m in re.findall(r"\]\(([^)\s]+)\)", readme) if not re.match(r"\w+://", m)}
    missing = sorted(t for t in targets if t and not (REPO / t).exists() and t not in PENDING)
    assert not missing, f"README.md links to files that don't exist: {missing}"


def test_no_internal_issue_numbers():
    """Readers of the README, the docs and the code don't have the project's issue tracker: say what a
    change does, not which issue asked for it."""
    import re

    pattern = re.compile(r"\bissues? ?#?\d+\b|\bissue \d+'s\b", re.I)
    files = [REPO / "README.md", REPO / "deployments.yaml", *(REPO / "docs").rglob("*.md")]
    for folder in ("flows", "tasks", "emulator", "schemas", "benchmarks", "tests", "data"):
        files += (REPO / folder).rglob("*.py")
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line) and path.name != "test_docs_site.py"
    ]
    assert not found, "internal issue numbers:\n" + "\n".join(found)
