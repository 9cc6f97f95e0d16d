"""`gembatch demo`: the main job on the sample corpus, against the built-in emulator."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import polars as pl
from rich.console import Console

from flows.embed import embed_flow

__all__ = ["run_demo", "DATA_DIR"]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def run_demo(*, output: str, fresh: bool, console: Console) -> dict:
    from flows.options import print_summary

    corpus = DATA_DIR / "corpus.parquet"
    if fresh:
        shutil.rmtree(output, ignore_errors=True)
    console.print(f"[bold]gembatch demo[/]: embedding {corpus} with the built-in emulator (--provider local)")
    document = asyncio.run(embed_flow(input=str(corpus), output=output, provider="local", chunk_size=100))
    print_summary(document)
    frame = pl.read_parquet(f"{output}/*.parquet").sort("id")
    console.print(f"\nThe output is in [bold]{output}/[/] ({frame.height} rows). Read it with polars:\n")
    console.print(
        f'    import polars as pl\n    df = pl.read_parquet("{output}/*.parquet")\n    print(df.head())\n',
        highlight=False,
    )
    preview = frame.select(
        "id",
        pl.col("embedding")
        .arr.head(3)
        .cast(pl.List(pl.Float64))
        .list.eval(pl.element().round(4))
        .alias("embedding[:3]"),
        "model",
    )
    with pl.Config(tbl_width_chars=80, fmt_table_cell_list_len=3):
        console.print(str(preview.head(5)), highlight=False, markup=False)
    console.print("\nRun `uv run gembatch demo` again: every row is already done, so it sends no request.")
    return document
