"""The options every job shares, declared once: type, default, description and command-line flag.

Every flow takes them as one parameter, ``options: CommonOptions``; Prefect validates it (a dict from a
deployment, or the model from Python), shows it in a deployment's run form with these descriptions,
and stores it as a nested mapping (``deployments.yaml``: ``parameters: {options: {rpm: 1500}}``). The
`gembatch` commands make one typer option a field from the same declarations (flows/options.py), and
the "Common options" table of docs/reference/cli.md is generated from them (``uv run python -m flows.docgen``;
a test fails when it drifts). A new common option is one field here.

This module imports only pydantic and the plain constants of tasks/defaults.py: `gembatch --help`
reads it, and must not pay for Prefect, pyarrow or openai.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from tasks.defaults import (
    DEFAULT_AUTO_MIN_REQUESTS,
    DEFAULT_BATCH_POLL_S,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_OUTAGE_S,
    DEFAULT_TIMEOUT_S,
    MAX_BATCH_REQUESTS,
)

__all__ = ["CommonOptions", "cli_flag", "flat_parameters", "flow_arguments", "options_table"]


def _cli(flag: str, metavar: str | None = None, *, help: str | None = None) -> dict[str, Any]:
    """A field's command-line flag, the placeholder the docs show after it, and the flag's own help
    where the field's description doesn't fit it (a ``--no-…`` flag). Kept in the JSON schema too."""
    return {"cli": flag} | ({"metavar": metavar} if metavar else {}) | ({"cli_help": help} if help else {})


class CommonOptions(BaseModel):
    """Options every gembatch job takes: where requests go, how fast, and how the run is controlled."""

    # Titles are the field names, as deployments.yaml spells them (Prefect's form shows the titles).
    model_config = ConfigDict(frozen=True, extra="forbid", field_title_generator=lambda name, _: name)

    id_col: str = Field("id", description="Column with each row's unique id.", json_schema_extra=_cli("--id-col"))
    # Where requests go and where the key comes from (docs/how-to/providers.md).
    provider: str = Field(
        "gemini",
        description="gemini (GEMINI_API_KEY), openai (OPENAI_API_KEY) or local (the built-in emulator).",
        json_schema_extra=_cli("--provider"),
    )
    base_url: str | None = Field(
        None,
        description="Any OpenAI-compatible server (vLLM, Ollama, LiteLLM).",
        json_schema_extra=_cli("--base-url", "URL"),
    )
    base_url_secret: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding the base URL, for a URL with credentials in it "
        "(user:pass@, ?key=): the run connects to it, and only the URL with its credentials redacted is shown "
        "or stored (what --shards hands its flow runs).",
        json_schema_extra=_cli("--base-url-secret", "BLOCK"),
    )
    api_key_env: str | None = Field(
        None, description="Environment variable that holds the key.", json_schema_extra=_cli("--api-key-env", "NAME")
    )
    api_key_secret: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding the key (instead of an environment variable).",
        json_schema_extra=_cli("--api-key-secret", "BLOCK"),
    )
    # Your quota (docs/explanation/rate-limits.md).
    rpm: float | None = Field(
        None, description="Requests per minute allowed (your quota).", json_schema_extra=_cli("--rpm", "N")
    )
    tpm: float | None = Field(
        None, description="Input tokens per minute allowed (your quota).", json_schema_extra=_cli("--tpm", "N")
    )
    rate_window: float = Field(
        60.0,
        gt=0,
        description="Seconds over which --rpm/--tpm are counted (60: per minute; a server that counts over 10 s "
        "windows gets 10, and --rpm N then means N per window).",
        json_schema_extra=_cli("--rate-window"),
    )
    max_concurrency: int | None = Field(
        None,
        description="Your own cap on requests in flight (default: as many as --rpm and the latency need, "
        "at most 1024).",
        json_schema_extra=_cli("--max-concurrency", "N"),
    )
    timeout: float = Field(
        DEFAULT_TIMEOUT_S,
        description="Seconds before one request is abandoned (and retried).",
        json_schema_extra=_cli("--timeout"),
    )
    max_outage: float = Field(
        DEFAULT_MAX_OUTAGE_S,
        description="Seconds the run waits, probing, while the provider answers only 5xx/timeouts, before it "
        "ends 'stopped: provider unavailable' (resumable).",
        json_schema_extra=_cli("--max-outage"),
    )
    # What the run does.
    chunk_size: int = Field(
        DEFAULT_CHUNK_SIZE,
        description="Rows per chunk (one Prefect task and one part file each).",
        json_schema_extra=_cli("--chunk-size"),
    )
    limit: int | None = Field(
        None, description="Only the first N rows of the input.", json_schema_extra=_cli("--limit", "N")
    )
    retry_errors: bool = Field(
        False,
        description="Also resend the rows in _errors/ that failed for their own input (retry = on_request); "
        "rows that failed on transient errors only are resent by every plain rerun.",
        json_schema_extra=_cli("--retry-errors"),
    )
    dry_run: bool = Field(
        False,
        description="Count what would be sent, estimate tokens, cost and minutes at --rpm/--tpm; send nothing, "
        "write nothing, need no key.",
        json_schema_extra=_cli("--dry-run"),
    )
    max_cost_usd: float | None = Field(
        None,
        description="No new request once the estimated cost (spent + in flight) would pass this many USD: the "
        "run ends 'stopped: budget', resumable.",
        json_schema_extra=_cli("--max-cost-usd", "X"),
    )
    force: bool = Field(
        False,
        description="Write into a folder that holds another job's or model's results (otherwise refused).",
        json_schema_extra=_cli("--force"),
    )
    change_model: bool = Field(
        False,
        description="Move the output to --model (or today's default): every row is sent again with it and its "
        "old row superseded; with --dry-run, shows the rows it would re-send and their cost. Without it a run "
        "keeps the model the output was made with.",
        json_schema_extra=_cli("--change-model"),
    )
    prices: str | None = Field(
        None,
        description="TOML or JSON file of prices (USD) that add to or override the built-in table, optionally "
        "from a date (default: the file GEMBATCH_PRICES names).",
        json_schema_extra=_cli("--prices", "FILE"),
    )
    max_failed_pct: float = Field(
        0.0,
        description="Share of failed rows (%) above which the run ends 'completed with errors' "
        "(exit 4, Prefect flow run Failed).",
        json_schema_extra=_cli("--max-failed-pct"),
    )
    # Batch mode (docs/how-to/batch-mode.md).
    mode: str = Field(
        "live",
        description="live (one request at a time), batch (the provider's batch API: half price, results within "
        "24 h, re-attached after a crash) or auto (batches for the bulk, live for the rest).",
        json_schema_extra=_cli("--mode"),
        pattern="^(live|batch|auto)$",
    )
    batch_poll: float = Field(
        DEFAULT_BATCH_POLL_S,
        description="Seconds between two polls of the submitted batches.",
        json_schema_extra=_cli("--batch-poll"),
    )
    batch_max_requests: int = Field(
        MAX_BATCH_REQUESTS,
        description="Most requests in one batch (one request file); also capped at 50,000 embedding inputs and 100 MB.",
        json_schema_extra=_cli("--batch-max-requests", "N"),
    )
    auto_min_requests: int = Field(
        DEFAULT_AUTO_MIN_REQUESTS,
        description="--mode auto: a request file with fewer requests than this is sent live instead.",
        json_schema_extra=_cli("--auto-min-requests", "N"),
    )
    # Past one machine (docs/how-to/scale-out.md).
    shards: int = Field(
        1,
        ge=1,
        description="Split the input into N parts by id hash and run each as a flow run of the job's deployment on "
        "its work pool (needs a Prefect server and workers); one summary adds them up.",
        json_schema_extra=_cli("--shards", "N"),
    )
    shard: str | None = Field(
        None,
        description="Run only part I of N of the input (what --shards gives each flow run); writes beside the "
        "other parts and leaves compaction to the run that started them.",
        json_schema_extra=_cli("--shard", "I/N"),
    )
    # A LanceDB table as the output (--output lancedb://PATH/TABLE, docs/how-to/vector-index.md).
    delete_missing: bool = Field(
        False,
        description="With --output lancedb://PATH/TABLE: delete from the table the ids that are no longer in "
        "the input.",
        json_schema_extra=_cli("--delete-missing"),
    )
    vector_index: bool = Field(
        False,
        description="With --output lancedb://PATH/TABLE: build the table's vector index (IVF_SQ, cosine) once it "
        "holds 100,000 rows, and rebuild it when 10% of its rows are not in it.",
        json_schema_extra=_cli("--index"),
    )
    keep_text: bool = Field(
        False,
        description="With --output lancedb://PATH/TABLE: the table also holds the input's text column (--text-col) "
        "beside each row's result; off: ids, results and hashes only. Refused with a Parquet output.",
        json_schema_extra=_cli("--keep-text"),
    )
    # The command shows a bar on a terminal unless --no-progress; a flow run shows none unless asked.
    progress: bool = Field(
        False,
        description="Show a progress bar on stderr.",
        json_schema_extra=_cli("--no-progress", help="No progress bar (the command shows one on a terminal)."),
    )
    # Streamed chat replies (tasks/jobs/chat.py).
    stream: bool = Field(
        False,
        description="Chat jobs (generate, extract, caption, transcribe --api chat): receive each reply as a "
        "stream; a stream that stalls, breaks off or ends without a finish reason is retried, and time to "
        "first token goes into _runs/.",
        json_schema_extra=_cli("--stream"),
    )
    idle_timeout: float = Field(
        DEFAULT_IDLE_TIMEOUT_S,
        description="With --stream: seconds allowed between two chunks of a reply before the attempt is "
        "abandoned (and retried).",
        json_schema_extra=_cli("--idle-timeout"),
    )

    @field_serializer("base_url", when_used="json")
    def _base_url_shown(self, value: str | None) -> str | None:
        """As Prefect stores a flow run's parameters (JSON): credentials in the URL redacted. The run
        itself gets the model as it is."""
        from tasks.redact import redact_url  # --help imports this module, and nothing it doesn't need

        return None if value is None else redact_url(value)


def flow_arguments(parameters: dict[str, Any]) -> dict[str, Any]:
    """Flat parameters (the command line's) as a flow's arguments: the common fields become ``options``."""
    own = {k: v for k, v in parameters.items() if k not in CommonOptions.model_fields}
    return own | {"options": CommonOptions.model_validate({k: v for k, v in parameters.items() if k not in own})}


def flat_parameters(arguments: dict[str, Any]) -> dict[str, Any]:
    """A flow's arguments as one flat mapping, the common options' fields beside the job's own, as the
    command line gathers them: the inverse of :func:`flow_arguments`."""
    options = CommonOptions.model_validate(arguments.get("options") or {})
    return {k: v for k, v in arguments.items() if k != "options"} | options.model_dump()


def cli_flag(name: str) -> tuple[str, str]:
    """The command-line flag of field ``name`` (a ``--no-…`` flag turns the boolean off) and its help."""
    field = CommonOptions.model_fields[name]
    return field.json_schema_extra["cli"], field.json_schema_extra.get("cli_help", field.description)


def options_table() -> str:
    """The "Common options" table of docs/reference/cli.md, made from the declarations above."""
    rows = ["| option | default | what it does |", "|---|---|---|"]
    for name, field in CommonOptions.model_fields.items():
        flag, help = cli_flag(name)
        metavar = field.json_schema_extra.get("metavar")
        shown_flag = flag if metavar is None else f"{flag} {metavar}"
        shown = "off" if isinstance(field.default, bool) else "–" if field.default is None else f"`{field.default}`"
        rows.append(f"| `{shown_flag}` | {shown} | {help.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"
