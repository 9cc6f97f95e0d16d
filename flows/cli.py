"""The `gembatch` command: a thin typer layer over the flows.

Imports stay light here: typer, rich and the commands' signatures. Prefect, polars, pyarrow and the job
modules are imported only by the command that needs them (tests/test_cli.py checks `--help`).
"""

from __future__ import annotations

import asyncio
import os
import sys
from contextlib import nullcontext
from typing import Annotated

import typer

from flows import commands
from flows.options import ApiKeyEnv, BaseUrl, Provider, console, err_console
from tasks.errors import GembatchError

app = typer.Typer(
    help="Rate-limited, resumable LLM batch jobs over Parquet/CSV (Gemini's OpenAI-compatible API by default).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("embed")(commands.embed)
app.command("extract")(commands.extract)
app.command("generate")(commands.generate)
app.command("images")(commands.images)
app.command("caption")(commands.caption)
app.command("transcribe")(commands.transcribe)


@app.command()
def demo(
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Where the demo writes (one folder per job); default: data/out/demo in a folder with the samples "
            "in data/ (a checkout of the repository), else ./gembatch-demo.",
        ),
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete the demo output first.")] = False,
) -> None:
    """Run every job on the bundled samples (data/ in the repository) with the built-in emulator and show the
    results."""
    from flows.demo import run_demo
    from flows.tracking import UNTRACKED_NOTE, configured_api_url

    tracked = configured_api_url() is not None
    if not tracked:
        err_console.print(UNTRACKED_NOTE, markup=False, highlight=False, soft_wrap=True)
    run_demo(output=output, fresh=fresh, console=console, tracked=tracked)


@app.command()
def emulator(
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1 (0: a free one).")] = 8000,
    api_key_env: Annotated[
        str, typer.Option("--api-key-env", help="Variable with the key clients must send.")
    ] = "GEMBATCH_EMULATOR_KEY",  # noqa: E501
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per window before 429s.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Input tokens per window before 429s.")] = None,
    rpd: Annotated[int | None, typer.Option("--rpd", help="Requests per day before a PerDay 429.")] = None,
    window: Annotated[float, typer.Option("--window", help="Rate window in seconds.")] = 60.0,
    pace: Annotated[
        float | None,
        typer.Option(
            "--pace",
            help="Also hold --rpm over every PACE seconds, as OpenAI does (60,000 RPM enforced as 1,000 a "
            "second): a bucket of rpm*PACE/window requests.",
        ),
    ] = None,
    latency: Annotated[float, typer.Option("--latency", help="Seconds added to every answer (the mean).")] = 0.0,
    latency_jitter: Annotated[
        float, typer.Option("--latency-jitter", help="Lognormal spread of the latency (sigma; 0 = fixed).")
    ] = 0.0,
    fault_rate: Annotated[float, typer.Option("--fault-rate", help="Share of POSTs answered 503.")] = 0.0,
    json_schema: Annotated[
        str,
        typer.Option(
            "--json-schema",
            help="response_format json_schema: supported, rejected (Groq's 400 for a model without it) or "
            "ignored (answered with prose).",
        ),
    ] = "supported",
    retire: Annotated[
        list[str] | None,
        typer.Option(
            "--retire",
            metavar="MODEL",
            help="Play a retired model: every request for it answers 404 NOT_FOUND, as Google's do (repeatable).",
        ),
    ] = None,
    reroute: Annotated[
        list[str] | None,
        typer.Option(
            "--reroute",
            metavar="OLD=NEW",
            help="Play a reroute: requests for OLD are answered by NEW, the reply's model naming NEW (repeatable).",
        ),
    ] = None,
    legacy_models: Annotated[
        bool,
        typer.Option(
            "--legacy-models",
            help="Also serve ids a new key can't use any more (gemini-2.5-flash, Imagen 4, gemini-2.5-flash-image).",
        ),
    ] = False,
) -> None:
    """Serve the local OpenAI-compatible emulator (Gemini's quirks included) until Ctrl-C."""
    from emulator import EmulatorConfig, serve
    from emulator.catalog import DEFAULT_MODELS, LEGACY_MODELS
    from emulator.config import JSON_SCHEMA_SUPPORT

    key = os.environ.get(api_key_env) or "emulator-key"
    if json_schema not in JSON_SCHEMA_SUPPORT:
        raise typer.BadParameter(f"use one of {', '.join(JSON_SCHEMA_SUPPORT)}", param_hint="--json-schema")
    reroutes: dict[str, str] = {}
    for spec in reroute or []:
        old, sep, new = spec.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise typer.BadParameter(
                f"{spec!r}: write OLD=NEW, e.g. gemini-3.7-flash=gemini-3.8-flash", param_hint="--reroute"
            )
        reroutes[old.strip()] = new.strip()
    models = DEFAULT_MODELS + (LEGACY_MODELS if legacy_models else ())
    # A rerouted id stays listed and answered (by the other model), as Google's are.
    models += tuple(m for m in reroutes if m not in models)
    config = EmulatorConfig(
        api_key=key,
        rpm=rpm,
        tpm=tpm,
        rpd=rpd,
        window_seconds=window,
        pace_seconds=pace,
        latency_seconds=latency,
        latency_jitter=latency_jitter,
        fault_rate_503=fault_rate,
        json_schema=json_schema,
        models=models,
        retired=tuple(retire or ()),
        reroutes=reroutes,
    )
    if api_key_env not in os.environ:
        err_console.print(f"{api_key_env} is not set: clients must send the key 'emulator-key'.")
    serve(port, config)


@app.command()
def models(
    provider: Provider = "gemini",
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = None,
    prices: Annotated[
        str | None,
        typer.Option(
            "--prices", metavar="FILE", help="Prices file over the built-in table (default: $GEMBATCH_PRICES)."
        ),
    ] = None,
) -> None:
    """List the models the provider serves: gembatch's defaults marked, each one's known life and price."""
    from rich.table import Table

    from tasks.provider.client import ProviderSettings, list_models
    from tasks.provider.prices import use_prices

    book = use_prices(prices)
    from flows.local import local_provider

    with local_provider(ProviderSettings(provider=provider, base_url=base_url, api_key_env=api_key_env)) as settings:
        names = asyncio.run(list_models(settings))
    table = Table("model", "default for", "lifecycle", "price today", "source")
    table.columns[0].no_wrap = True  # a model id is copied from here: never cut in two
    for row in model_rows(names, provider, book):
        table.add_row(*row)
    console.print(table)
    console.print(
        "Lifecycle and prices as gembatch knew them on 2026-12-06 (docs/reference/models.md); give your own "
        "prices with --prices FILE or GEMBATCH_PRICES.",
        highlight=False,
    )


def model_rows(names: list[str], provider: str, book: object) -> list[tuple[str, str, str, str, str]]:
    """The rows of `gembatch models`: the provider's list, then defaults it doesn't list."""
    from datetime import date

    from tasks.provider.catalog import CATALOG_DATE, DEFAULT_MODELS, model_info
    from tasks.provider.prices import PriceBook

    assert isinstance(book, PriceBook)
    defaults: dict[str, list[str]] = {}
    for kind, model in DEFAULT_MODELS.get(provider, DEFAULT_MODELS["gemini"]).items():
        defaults.setdefault(model, []).append(kind)
    listed = [name.removeprefix("models/") for name in names]
    rows = []
    for name in [*listed, *(m for m in defaults if m not in listed)]:
        info = model_info(name)
        price = book.price(name)
        lifecycle = info.lifecycle() if info else "not in gembatch's catalog"
        if name not in listed:
            lifecycle = f"NOT LISTED by this server; {lifecycle}"
        sources = [f"life: {info.source}"] if info else []
        if price is not None and price.source:
            sources.append(f"price: {price.source}")
        kinds = defaults.get(name, [])
        shown = price.describe() + (f" (since {price.since})" if price.since else "") if price else "unknown"
        today = date.today()
        later = [p for p in book.schedule(name) if p.since is not None and p.since > today]
        if later:
            shown += f"; from {later[0].since}: {later[0].describe()}"
        rows.append(
            (
                name,
                "* " + ", ".join(kinds) if kinds else "",
                lifecycle,
                shown,
                " · ".join(sources) or f"(not in the catalog of {CATALOG_DATE})",
            )
        )
    return rows


@app.command()
def batches(
    output: Annotated[str, typer.Argument(help="The output folder of a --mode batch or auto run.")],
    refresh: Annotated[bool, typer.Option("--refresh", help="Ask the provider for each batch's state now.")] = False,
    cancel: Annotated[
        bool,
        typer.Option(
            "--cancel",
            help="Cancel every batch not yet written (finished lines are kept; the next run sends the rest).",
        ),
    ] = False,
    provider: Annotated[
        str | None, typer.Option("--provider", help="Where the batches were sent (default: as recorded).")
    ] = None,
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = None,
) -> None:
    """List the batches recorded in OUTPUT/_batches/ with their states; --cancel cancels them."""
    from rich.table import Table

    from tasks.engine.send.batch.manage import manage_batches
    from tasks.provider.client import ProviderSettings

    settings = None
    if provider or base_url or api_key_env:
        settings = ProviderSettings(provider=provider or "gemini", base_url=base_url, api_key_env=api_key_env)
    from flows.local import local_provider

    with local_provider(settings) if settings else nullcontext(None) as settings:
        records = asyncio.run(manage_batches(output, settings, refresh=refresh or cancel, cancel=cancel))
    table = Table("record", "batch id", "state", "provider status", "requests", "done / failed", "created", "note")
    for r in records:
        counts = r.get("request_counts") or {}
        done = f"{counts.get('completed', '-')} / {counts.get('failed', '-')}" if counts else "-"
        note = r.get("error") or (
            f"{r.get('lines_unfinished')} unfinished, sent again by the next run" if r.get("lines_unfinished") else ""
        )
        table.add_row(
            r["name"], r.get("batch_id") or "-", r["state"], r.get("status") or "-", str(r.get("requests")), done,
            r.get("created_at", ""), note,
        )  # fmt: skip
    console.print(table)


def _limit_malloc_arenas() -> None:
    # Chunks are read and written on worker threads; glibc gives each thread its own malloc arena, and
    # the arenas keep freed vector buffers, so peak RSS crept up with the input's length. Two arenas
    # keep it flat (measured in benchmarks/bench_embed.py).
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-8, 2)  # M_ARENA_MAX
            # A fixed mmap threshold: blocks of 256 KiB and more (the done-key index's arrays, the id
            # check's table) go back to the system when freed, instead of staying in the heap once
            # glibc's adaptive threshold has risen (measured: a 10M-row rerun peaked 56 MiB lower).
            libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


def main() -> None:
    _limit_malloc_arenas()
    # Arrow's buffers (decoded input row groups, part files) from malloc, under the thresholds above:
    # freed buffers go back to the system. Its default (mimalloc) kept ~60 MiB more while reading a
    # 500,000-row row group (benchmarks/bench_scale.py). Read by Arrow when it first allocates.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    # Prefect's temporary server would try to send telemetry; many batch hosts have no way out.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(run_cli())


# Set to 1 to see the Python traceback of an unexpected error (for developers and bug reports).
DEBUG_ENV = "GEMBATCH_DEBUG"


def run_cli(argv: list[str] | None = None) -> int:
    """The `gembatch` command's exit code. Nothing a server, a gateway or the input does ends in a
    traceback: every error is one paragraph on stderr (GEMBATCH_DEBUG=1 re-raises, for developers)."""
    from flows.options import EXIT_STOPPED

    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false")
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except (GembatchError, ValueError) as exc:
        if debug:
            raise
        from tasks.redact import redact_text  # here, not at the top: --help imports only what it shows

        err_console.print(f"[bold red]error:[/] {redact_text(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        err_console.print("interrupted: rerun the same command to resume", highlight=False)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one paragraph, never a traceback
        if debug:
            raise
        from tasks.redact import redact_text

        err_console.print(f"[bold red]error:[/] {redact_text(_unexpected(exc))}", highlight=False)
        return EXIT_STOPPED
    return 0


def _unexpected(exc: BaseException) -> str:
    try:
        from tasks.provider.failures import classify_failure

        failure = classify_failure(exc)
    except BaseException:  # noqa: BLE001 - not a server's answer: a bug to report
        detail = " ".join(str(exc).split())[:300]
        return (
            f"gembatch stopped on an unexpected {type(exc).__name__}: {detail}. Finished rows are kept and a rerun "
            f"of the same command resumes. This is a bug: rerun with {DEBUG_ENV}=1 to see the traceback, and "
            "report it with that output."
        )
    return (
        f"the server answered {failure.message.rstrip('.')}; gembatch stopped there. Finished rows are kept and a "
        f"rerun of the same command resumes ({DEBUG_ENV}=1 shows the traceback)."
    )


if __name__ == "__main__":
    main()
