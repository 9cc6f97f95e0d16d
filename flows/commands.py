"""The job commands (`gembatch embed`, `extract`, …): their own arguments and options, typed.

Typer builds each command's `--help` from these signatures (plus the common options of
flows/options.py), so this module imports only typer and the defaults in tasks/defaults.py: help costs no
Prefect, pyarrow or openai import. The flow and the job builder behind a command are named as
"module:attribute" and imported when the command runs.
"""

from __future__ import annotations

from typing import Annotated

import typer

from flows.options import Output, job_command
from tasks.defaults import (
    APIS,
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_MAX_SIDE,
    DEFAULT_SEGMENT_FORMAT,
    DEFAULT_SEGMENT_S,
    DEFAULT_SIZE,
    MAX_INLINE_BYTES,
    SEGMENT_FORMATS,
)

__all__ = ["caption", "embed", "extract", "generate", "images", "transcribe"]

CHAT_MODEL_HELP = "Chat model (default: gemini-3.8-flash; gpt-4o-mini for openai; an existing output keeps its own)."
REASONING_HELP = (
    "minimal, low, medium or high (gemini-4-argon: low, medium, high; none only on 2.5 models; default: the "
    "model's own)."
)
Input = Annotated[str, typer.Argument(help="Parquet or CSV file (local path or fsspec URL).")]
MediaInput = Annotated[
    str,
    typer.Argument(
        help="Parquet or CSV file naming the files, or a folder or quoted glob of them ('rec/**/*.mp3'); "
        "local path or fsspec URL. A folder or glob: id = the path relative to it."
    ),
]
# Where the files named in a media column may be (tasks/jobs/media_access.py); caption and transcribe.
MediaRoot = Annotated[
    list[str] | None,
    typer.Option(
        "--media-root",
        help="Also read media files under this folder or URL prefix (repeatable); by default a path in the "
        "column must lie under the input's own folder (symbolic links resolved).",
    ),
]
AllowMediaScheme = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-media-scheme",
        help="Read URLs of this scheme anywhere (repeatable: https, s3, gs…); by default only local files and "
        "the input's own scheme under its prefix. http(s) is fetched by gembatch itself.",
    ),
]
AllowPrivateUrls = Annotated[
    bool,
    typer.Option(
        "--allow-private-urls",
        help="Let http(s) media URLs reach loopback, private and link-local addresses (refused by default).",
    ),
]


@job_command("flows.embed:embed_flow", "flows.jobs:embed_job")
def embed(
    input: Input,
    output: Output,
    text_col: Annotated[str, typer.Option("--text-col", help="Column with the text to embed.")] = "text",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Embedding model (default: gemini-embedding-2; text-embedding-3-small for openai; an existing "
            "output keeps its own).",
        ),
    ] = None,  # noqa: E501
    dimensions: Annotated[int | None, typer.Option("--dimensions", help="Shorter vectors (normalised here).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per request (Gemini allows 100).")] = 100,
) -> None:
    """Embed a text column: one fixed-size float32 vector per row."""


@job_command("flows.extract:extract_flow", "flows.jobs:extract_job")
def extract(
    input: Input,
    output: Output,
    schema_ref: Annotated[
        list[str],
        typer.Option(
            "--schema",
            help="Pydantic model to extract, as MODULE:Model (e.g. schemas.examples:Invoice). Repeat it with --via "
            "tools to let the model pick one per row (a kind column plus one struct column per schema).",
        ),
    ],
    text_col: Annotated[str, typer.Option("--text-col", help="Column with the text to read.")] = "text",
    prompt: Annotated[str | None, typer.Option("--prompt", help="System instruction (default: a short one).")] = None,
    prompt_file: Annotated[
        str | None, typer.Option("--prompt-file", help="File holding the system instruction.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help=CHAT_MODEL_HELP)
    ] = None,
    reasoning_effort: Annotated[
        str | None,
        typer.Option("--reasoning-effort", help=REASONING_HELP),
    ] = None,
    schema_dialect: Annotated[
        str | None,
        typer.Option(
            "--schema-dialect",
            help="JSON schema form sent: openai (strict), gemini or plain (default: by provider; plain for "
            "another --base-url).",
        ),
    ] = None,
    via: Annotated[
        str,
        typer.Option(
            "--via",
            help="json_schema (response_format) or tools (the schema sent as a function, forced by tool_choice).",
        ),
    ] = "json_schema",
) -> None:
    """Extract a pydantic model from a text column: one typed column per field."""


@job_command("flows.generate:generate_flow", "flows.jobs:generate_job")
def generate(
    input: Input,
    output: Output,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            help="Template of the user message; {column} is filled from each row, e.g. 'Summarise in one line: "
            "{text}' (sent as it is: no hidden instructions).",
        ),
    ] = None,
    prompt_file: Annotated[
        str | None, typer.Option("--prompt-file", help="File holding the template (instead of --prompt).")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="System instruction sent before each row.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help=CHAT_MODEL_HELP)
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", help="0-2 (default: the model's own); deprecated for Gemini 3 and 4 models."),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", help="Most tokens per answer; a cut answer is kept with truncated = true."),
    ] = None,
    reasoning_effort: Annotated[
        str | None,
        typer.Option("--reasoning-effort", help=REASONING_HELP),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Completions per row (1-8), one output row each.")] = 1,
) -> None:
    """Generate text from a prompt template over each row: text, finish_reason, truncated, usage."""


@job_command("flows.caption:caption_flow", "flows.jobs:caption_job")
def caption(
    input: MediaInput,
    output: Output,
    image_col: Annotated[
        str,
        typer.Option("--image-col", help="Column with image paths or URLs (relative to the input's folder)."),
    ] = "image",
    prompt: Annotated[str, typer.Option("--prompt", help="What to ask about each image.")] = DEFAULT_CAPTION_PROMPT,
    model: Annotated[
        str | None,
        typer.Option("--model", help=CHAT_MODEL_HELP),
    ] = None,
    max_side: Annotated[
        int, typer.Option("--max-side", help="Downscale images whose longer side exceeds this many pixels.")
    ] = DEFAULT_MAX_SIDE,
    media_root: MediaRoot = None,
    allow_media_scheme: AllowMediaScheme = None,
    allow_private_urls: AllowPrivateUrls = False,
) -> None:
    """Caption an image column: one short description per image."""


def _check_api(value: str) -> str:
    if value not in APIS:
        raise typer.BadParameter(f"use one of {', '.join(APIS)}")
    return value


def _check_segment_format(value: str) -> str:
    if value not in SEGMENT_FORMATS:
        raise typer.BadParameter(f"use one of {', '.join(SEGMENT_FORMATS)}")
    return value


@job_command("flows.transcribe:transcribe_flow", "flows.jobs:transcribe_job")
def transcribe(
    input: MediaInput,
    output: Output,
    audio_col: Annotated[
        str,
        typer.Option("--audio-col", help="Column with audio paths or URLs (relative to the input's folder)."),
    ] = "audio",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Model (default: gemini-3.8-flash; gpt-4o-mini for openai; whisper-1 for transcriptions; an "
            "existing output keeps its own).",
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help="Instruction (chat; default: verbatim) or style hint (transcriptions)."),
    ] = None,
    api: Annotated[
        str,
        typer.Option(
            "--api",
            callback=_check_api,
            help="chat (input_audio; Gemini) or transcriptions (OpenAI-style servers).",
        ),
    ] = "chat",
    max_inline_bytes: Annotated[
        int, typer.Option("--max-inline-bytes", help="Largest audio payload per request (Gemini: 20 MB inline).")
    ] = MAX_INLINE_BYTES,
    segment_s: Annotated[
        float,
        typer.Option("--segment-s", help="Cut longer recordings into segments of about this many seconds."),
    ] = DEFAULT_SEGMENT_S,
    segment_format: Annotated[
        str,
        typer.Option(
            "--segment-format",
            callback=_check_segment_format,
            help="How segments are sent: mp3 (32 kbps mono, 4 KB/s) or wav (16-bit, 32 KB/s).",
        ),
    ] = DEFAULT_SEGMENT_FORMAT,
    media_root: MediaRoot = None,
    allow_media_scheme: AllowMediaScheme = None,
    allow_private_urls: AllowPrivateUrls = False,
) -> None:
    """Transcribe recordings (any length; mp3, m4a, ogg/opus, flac, wav, webm/mp4 audio): one row each."""


@job_command("flows.images:images_flow", "flows.jobs:images_job")
def images(
    input: Input,
    output: Output,
    prompt_col: Annotated[str, typer.Option("--prompt-col", help="Column with the image prompt.")] = "prompt",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Image model (default: gemini-nano-banana-2.1; gpt-image-1 for openai; an existing output keeps "
            "its own). Also gemini-3-pro-image, gemini-3.1-flash-lite-image, dall-e-3.",
        ),
    ] = None,
    size: Annotated[
        str,
        typer.Option(
            "--size",
            help="WIDTHxHEIGHT: Gemini image models take 1:1, 2:3, 3:2, 3:4, 4:3, 4:5, 5:4, 9:16, 16:9, 21:9; "
            "gpt-image-1 1024x1024, 1536x1024, 1024x1536, auto; dall-e-3 1024x1024, 1792x1024, 1024x1792.",
        ),
    ] = DEFAULT_SIZE,
    n: Annotated[
        int, typer.Option("--n", help="Images per prompt, one output row each (Gemini: 1-4; dall-e-3: 1).")
    ] = 1,
    quality: Annotated[
        str | None,
        typer.Option("--quality", help="gpt-image-1: low, medium, high, auto; dall-e-3: standard, hd (priced so)."),
    ] = None,
) -> None:
    """Generate images from a prompt column: files in OUTPUT/_images/, one row per image."""
