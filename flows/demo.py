"""`gembatch demo`: every job on the committed samples in data/, against the built-in emulator.

The samples are data/ in a checkout of the repository; an installed wheel carries the same files as
flows/demo_data/ (pyproject.toml's force-include), so the demo runs from any folder.

Tracked, the jobs are their Prefect flows; untracked (no Prefect API configured), the same jobs run
without Prefect, as `gembatch JOB` does then.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from flows import commands
from flows.options import built_job, command_params, resolve
from flows.params import flow_arguments

__all__ = ["DATA_DIR", "default_output", "run_demo"]

REPO_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def _samples_dir() -> Path:
    """flows/demo_data/ in an installed wheel, else the repository's data/."""
    shipped = Path(str(files("flows").joinpath("demo_data")))
    return shipped if (shipped / "corpus.parquet").is_file() else REPO_DATA_DIR


DATA_DIR = _samples_dir()


def default_output() -> str:
    """data/out/demo where the current folder has the samples in data/ (a checkout of the repository, as
    before); elsewhere ./gembatch-demo, so that an installed tool writes one folder it names where it runs."""
    return os.path.join("data", "out", "demo") if Path("data", "corpus.parquet").is_file() else "gembatch-demo"


def _jobs(output: Path) -> list[tuple[Any, dict[str, Any]]]:
    local = {"provider": "local"}
    return [
        (commands.embed, {"input": str(DATA_DIR / "corpus.parquet"), "output": str(output / "embed"),
                          "chunk_size": 100, **local}),
        (commands.extract, {"input": str(DATA_DIR / "extract" / "invoices.csv"), "output": str(output / "extract"),
                            "schema_ref": "schemas.examples:Invoice", **local}),
        (commands.caption, {"input": str(DATA_DIR / "images.csv"), "output": str(output / "caption"), **local}),
        (commands.transcribe, {"input": str(DATA_DIR / "audio.csv"), "output": str(output / "transcribe"), **local}),
        (commands.images, {"input": str(DATA_DIR / "prompts.csv"), "output": str(output / "images"),
                           "size": "256x256", **local}),
        (commands.extract, {"input": str(DATA_DIR / "extract" / "documents.csv"), "output": str(output / "triage"),
                            "schema_ref": [f"schemas.examples:{m}" for m in ("Invoice", "Receipt", "Contract")],
                            "via": "tools", **local}),
        (commands.generate, {"input": str(DATA_DIR / "generate" / "reviews.csv"), "output": str(output / "generate"),
                             "prompt_file": str(DATA_DIR / "generate" / "prompt.txt"),
                             "system": "You are a concise product analyst.", "max_tokens": 64, "stream": True,
                             **local}),
    ]  # fmt: skip


async def _run_all(output: Path, tracked: bool) -> list[dict[str, Any]]:
    from flows.common import run_untracked

    documents = []
    for command, values in _jobs(output):
        if tracked:
            documents.append(await resolve(command.flow)(**flow_arguments(values)))
        else:
            parameters = command_params(command, **values)
            documents.append(await run_untracked(built_job(command.build_job, parameters)))
    return documents


def run_demo(*, output: str | None = None, fresh: bool, console: Console, tracked: bool = True) -> list[dict[str, Any]]:
    """Run every job into ``output``/<job>/ (None: :func:`default_output`) and print what they did: as
    Prefect flow runs when ``tracked``, else without Prefect (what the command does when no Prefect API
    is configured)."""
    root = Path(output if output is not None else default_output())
    if fresh:
        shutil.rmtree(root, ignore_errors=True)
    samples = "data/" if DATA_DIR == REPO_DATA_DIR else f"{DATA_DIR}/"
    console.print(
        f"[bold]gembatch demo[/]: every job on the samples in {samples}, against the built-in emulator "
        "(--provider local)"
    )
    documents = asyncio.run(_run_all(root, tracked))

    table = Table(title="gembatch demo")
    for column in ("job", "rows", "skipped", "dedup", "ok", "failed", "requests"):
        table.add_column(column)
    for doc in documents:
        c = doc["counts"]
        via = " --via tools" if doc.get("job_parameters", {}).get("via") == "tools" else ""
        table.add_row(
            doc["job"] + via, str(c["input_rows"]), str(c["skipped_done"]),
            str(c["deduplicated"]), str(c["succeeded"]), str(c["failed"]), str(doc["requests"]["sent"]),
        )  # fmt: skip
    console.print(table)
    console.print(f"Outputs: {root}/<job>/", highlight=False)
    console.print("Models: " + ", ".join(f"{d['job']} {d['provider']['model']}" for d in documents), highlight=False)
    console.print("Each output folder has _runs/<run-id>.json (the run metadata). Read a result with polars:\n")
    console.print(f'    import polars as pl\n    pl.read_parquet("{root}/embed/*.parquet")\n', highlight=False)

    _previews(root, console)
    _table_query(root, console)
    _model_lifecycle(root, console)
    again = "uv run gembatch demo" if DATA_DIR == REPO_DATA_DIR else "gembatch demo"
    console.print(f"\nRun `{again}` again: every row is already done, so nothing is sent.", highlight=False)
    return documents


def _previews(root: Path, console: Console) -> None:
    """The first rows of a few outputs, as polars reads them, and where the generated images are."""
    embed = pl.read_parquet(f"{root}/embed/*.parquet").sort("id")
    preview = embed.select(
        "id",
        pl.col("embedding")
        .arr.head(3)
        .cast(pl.List(pl.Float64))
        .list.eval(pl.element().round(4))
        .alias("embedding[:3]"),
        "model",
    )
    invoices = pl.read_parquet(f"{root}/extract/*.parquet").sort("id")
    with pl.Config(tbl_width_chars=100, fmt_table_cell_list_len=3, fmt_str_lengths=40):
        console.print(str(preview.head(3)), highlight=False, markup=False)
        console.print(
            str(invoices.select("id", "vendor", "invoice_date", "currency", "total").head(3)),
            highlight=False,
            markup=False,
        )
    generated = pl.read_parquet(f"{root}/generate/*.parquet").sort("id")
    with pl.Config(tbl_width_chars=100, fmt_str_lengths=52):
        console.print(
            str(generated.select("id", "text", "finish_reason", "truncated").head(3)),
            highlight=False,
            markup=False,
        )
    images = pq.read_table(root / "images")  # the folder is the table: the image files sit in _images/
    console.print(
        f"\n{images.num_rows} generated images in {root}/images/_images/; "
        f'pq.read_table("{root}/images") reads their table ({", ".join(images.column_names[:4])}, …).',
        highlight=False,
    )


def _table_query(root: Path, console: Console) -> None:
    """The corpus embedded into a LanceDB table (``--output lancedb://…  --keep-text``) and one query
    against it, read with LanceDB's own API; only where lancedb is installed (an optional extra)."""
    import importlib.util

    from flows.common import run_untracked

    if importlib.util.find_spec("lancedb") is None:
        console.print("\nLanceDB: not installed (pip install 'gembatch[lancedb]'), so no table here.", highlight=False)
        return
    import lancedb

    values = {"input": str(DATA_DIR / "corpus.parquet"), "output": f"lancedb://{root}/lancedb/corpus",
              "keep_text": True, "chunk_size": 100, "provider": "local"}  # fmt: skip
    doc = asyncio.run(run_untracked(built_job(commands.embed.build_job, command_params(commands.embed, **values))))
    table = lancedb.connect(f"{root}/lancedb").open_table("corpus")
    query = table.search().where("id = 7").limit(1).to_list()[0]
    found = table.search(query["embedding"]).metric("cosine").limit(3).to_list()
    console.print(
        f"\nLanceDB table {values['output']}: {table.count_rows()} rows with their text (--keep-text), "
        f"{doc['requests']['sent']} requests this run. The 3 nearest to row 7 (cosine distance):",
        highlight=False,
    )
    for row in found:
        text = row["text"] if len(row["text"]) <= 58 else row["text"][:57] + "…"
        console.print(f"  {row['id']:>3}  {max(row['_distance'], 0.0):.4f}  {text}", highlight=False, markup=False)


def _model_lifecycle(root: Path, console: Console) -> None:
    """What a long-lived pipeline meets: a retired model (stopped before sending) and a rerouted one
    (the emulator answers gemini-embedding-2 with gemini-embedding-001: no foreign vector is written)."""
    import logging
    import os
    import secrets

    from emulator import Emulator, EmulatorConfig
    from flows.common import run_untracked
    from tasks.errors import GembatchError

    # The run's own message says it below; the engine's log line would say it twice.
    logging.getLogger("gembatch.engine").setLevel(logging.ERROR)
    key_env = "GEMBATCH_DEMO_KEY"
    os.environ[key_env] = key = secrets.token_urlsafe(16)
    config = EmulatorConfig(api_key=key, reroutes={"gemini-embedding-2": "gemini-embedding-001"})
    console.print("\n[bold]Models that change under a pipeline[/] (a second emulator playing them):")
    with Emulator(config) as emu:
        server = {"provider": "local", "base_url": emu.base_url, "api_key_env": key_env}
        retired = command_params(
            commands.images, input=str(DATA_DIR / "prompts.csv"), output=str(root / "lifecycle-retired"),
            model="imagen-4.0-generate-001", size="256x256", **server,
        )  # fmt: skip
        try:
            asyncio.run(run_untracked(built_job(commands.images.build_job, retired)))
        except GembatchError as exc:
            said = str(exc).split(". ")
            console.print(f"  retired: {'. '.join(s for s in said if 'shut down' in s)}", highlight=False)
        shutil.rmtree(root / "lifecycle-rerouted", ignore_errors=True)
        rerouted = command_params(
            commands.embed, input=str(DATA_DIR / "corpus.parquet"), output=str(root / "lifecycle-rerouted"),
            limit=20, **server,
        )  # fmt: skip
        doc = asyncio.run(run_untracked(built_job(commands.embed.build_job, rerouted)))
        written = doc["counts"]["succeeded"]
        console.print(
            f"  rerouted: embed asked for {doc['provider']['model']}, the reply named "
            f"{', '.join(doc.get('served_models', {}))}: {doc['status']}, {written} vectors written",
            highlight=False,
        )
        console.print(
            f"  images requests sent: {emu.stats['by_route']['images/generations']}; see `gembatch models` and "
            "docs/reference/models.md",
            highlight=False,
        )
