"""Each job's object, built from its flow's (or command's) named, typed arguments — no Prefect here.

A builder takes every argument of its flow by name (``options`` the common ones; the defaults are the
flow's and the command's) and returns a :class:`FlowJob`: the job, where it reads and writes, the
options, and what the run metadata records as ``parameters``. The flows build their job with these, and
so does the command line before it decides whether to start a flow run at all: the checks that need no
server (key, input, columns, the --schema import) and an untracked run need the job but not Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from flows.params import CommonOptions
from tasks.errors import ConfigError
from tasks.provider.catalog import default_model

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tasks.engine.job import Job
    from tasks.jobs.media_access import MediaPolicy

# Each builder imports only its own job's module (Pillow for caption, pydantic models for extract…).

__all__ = [
    "FlowJob",
    "ModelChoice",
    "caption_job",
    "choose_model",
    "embed_job",
    "extract_job",
    "generate_job",
    "images_job",
    "transcribe_job",
]

ModelSource = Literal["--model", "output", "default"]


@dataclass(frozen=True)
class ModelChoice:
    """The model a run uses, and where it came from (recorded as ``parameters.model_from``)."""

    model: str
    source: ModelSource


@dataclass(frozen=True)
class FlowJob:
    """A job with what its run needs beside it: the input, the output, the common options, and the
    flow's own arguments as the run metadata records them (``model`` the one chosen)."""

    job: Job
    input: str
    output: str
    options: CommonOptions
    arguments: Mapping[str, Any]
    model_from: ModelSource

    def recorded(self) -> dict[str, Any]:
        """The run metadata's ``parameters``: the flow's own arguments, the common options (but
        ``progress``, which only says where the run was started) and where the model came from."""
        common = self.options.model_dump(exclude={"progress"})
        return dict(self.arguments) | common | {"model_from": self.model_from}


def choose_model(given: str | None, *, job: str, default: str, output: str, change_model: bool = False) -> ModelChoice:
    """The model of this run: --model if given; else the model the output was made with (a scheduled run
    keeps its model when gembatch's default changes); else ``default``. With --change-model and no
    --model: ``default`` (today's), whatever the output holds."""
    if given:
        return ModelChoice(given, "--model")
    owner = None if change_model else _output_owner(output)
    if owner is not None and owner.get("job") == job and owner.get("model"):
        return ModelChoice(owner["model"], "output")
    return ModelChoice(default, "default")


def _output_owner(output: str | None) -> dict[str, Any] | None:
    if not output:
        return None
    from tasks.engine.store.output import OutputStore

    try:
        return OutputStore(output).owner()
    except (OSError, ValueError):
        return None  # the run's own checks of the folder say what is wrong with it


def _choose(given: str | None, job: str, default: str, output: str, options: CommonOptions) -> ModelChoice:
    return choose_model(given, job=job, default=default, output=output, change_model=options.change_model)


def embed_job(
    input: str,
    output: str,
    text_col: str,
    model: str | None,
    dimensions: int | None,
    batch_size: int,
    options: CommonOptions,
) -> FlowJob:
    """The embed flow's job (fills in the provider's default model)."""
    from tasks.jobs.embed import EmbedJob

    choice = _choose(model, "embed", default_model(options.provider, "embed"), output, options)
    job = EmbedJob(model=choice.model, text_col=text_col, dimensions=dimensions, batch_size=batch_size)
    arguments = {"input": input, "output": output, "text_col": text_col, "model": choice.model}
    arguments |= {"dimensions": dimensions, "batch_size": batch_size}
    return FlowJob(job, input, output, options, arguments, choice.source)


def extract_job(
    input: str,
    output: str,
    schema_ref: str | list[str],
    text_col: str,
    prompt: str | None,
    prompt_file: str | None,
    model: str | None,
    reasoning_effort: str | None,
    schema_dialect: str | None,
    via: str,
    options: CommonOptions,
) -> FlowJob:
    """The extract flow's job (imports the schema(s), reads the prompt file, fills the model).

    ``--via tools`` (or several --schema) is function calling: :mod:`tasks.jobs.tools`."""
    from schemas.dialects import auto_dialect
    from tasks.jobs.extract import ExtractJob, import_model
    from tasks.jobs.tools import ToolsExtractJob

    choice = _choose(model, "extract", default_model(options.provider, "chat"), output, options)
    instruction = _one_prompt(prompt, prompt_file)
    refs = _schema_refs(schema_ref, via or "json_schema")
    common = {
        "model": choice.model,
        "text_col": text_col,
        "prompt": instruction,
        "reasoning_effort": reasoning_effort,
        "schema_dialect": schema_dialect or auto_dialect(options.provider, options.base_url),
    }
    if (via or "json_schema") == "tools":
        job: ExtractJob | ToolsExtractJob = ToolsExtractJob(schemas=tuple(import_model(r) for r in refs), **common)
    else:
        job = ExtractJob(schema=import_model(refs[0]), **common)
    _check_id_col(job, options.id_col)
    arguments = {"input": input, "output": output, "schema_ref": schema_ref, "text_col": text_col}
    arguments |= {"prompt": prompt, "prompt_file": prompt_file, "model": choice.model}
    arguments |= {"reasoning_effort": reasoning_effort, "schema_dialect": schema_dialect, "via": via}
    return FlowJob(job, input, output, options, arguments, choice.source)


def _schema_refs(schema_ref: str | list[str], via: str) -> list[str]:
    from tasks.jobs.tools import VIAS

    refs = [schema_ref] if isinstance(schema_ref, str) else list(schema_ref)
    if via not in VIAS:
        raise ConfigError(f"--via {via!r}: use json_schema (response_format) or tools (function calling)")
    if not refs:
        raise ConfigError("extract needs --schema MODULE:Model (e.g. schemas.examples:Invoice)")
    if len(refs) > 1 and via != "tools":
        raise ConfigError(
            f"{len(refs)} --schema given: choosing among several schemas (triage) works through function calling; "
            "add --via tools, or pass one --schema"
        )
    return refs


def _check_id_col(job: Any, id_col: str) -> None:
    """Refuse a schema whose column would take the name of the output's id column."""
    from tasks.jobs.tools import ToolsExtractJob

    if isinstance(job, ToolsExtractJob) and job.triage:
        if id_col in job.branches:
            raise ConfigError(
                f"--schema {job.branches[id_col].schema_ref}: its column would be {id_col!r}, the output's id "
                "column; rename the class or pass another --id-col"
            )
    elif any(f.name == id_col for f in job.mapping.fields):
        raise ConfigError(
            f"{job.schema.__name__}.{id_col}: the output's id column is also called {id_col!r}; rename the field "
            "or pass another --id-col"
        )


def generate_job(
    input: str,
    output: str,
    prompt: str | None,
    prompt_file: str | None,
    system: str | None,
    model: str | None,
    temperature: float | None,
    max_tokens: int | None,
    reasoning_effort: str | None,
    n: int,
    options: CommonOptions,
) -> FlowJob:
    """The generate flow's job (reads the template file, fills in the default chat model)."""
    from tasks.jobs.generate import GenerateJob

    choice = _choose(model, "generate", default_model(options.provider, "chat"), output, options)
    template = _one_prompt(prompt, prompt_file)
    if template is None:
        raise ConfigError(
            "generate needs a prompt template: --prompt 'Summarise in one line: {text}' or --prompt-file FILE "
            "(column names in braces are filled from each row)"
        )
    job = GenerateJob(
        model=choice.model, prompt=template, system=system, temperature=temperature, max_tokens=max_tokens,
        reasoning_effort=reasoning_effort, n=n, id_col=options.id_col,
    )  # fmt: skip
    arguments = {"input": input, "output": output, "prompt": prompt, "prompt_file": prompt_file, "system": system}
    arguments |= {"model": choice.model, "temperature": temperature, "max_tokens": max_tokens}
    arguments |= {"reasoning_effort": reasoning_effort, "n": n}
    return FlowJob(job, input, output, options, arguments, choice.source)


def _one_prompt(prompt: str | None, prompt_file: str | None) -> str | None:
    """--prompt, or the text of --prompt-file (not both)."""
    if prompt is not None and prompt_file is not None:
        raise ConfigError("--prompt and --prompt-file both given: pass only one")
    return _read_prompt(prompt_file) if prompt_file is not None else prompt


def _read_prompt(path: str) -> str:
    import fsspec

    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--prompt-file {path!r} can't be read: {exc}") from None
    if not text:
        raise ConfigError(f"--prompt-file {path!r} is empty: write the instruction into it, or drop the option")
    return text


def caption_job(
    input: str,
    output: str,
    image_col: str,
    prompt: str,
    model: str | None,
    max_side: int,
    media_root: list[str] | None,
    allow_media_scheme: list[str] | None,
    allow_private_urls: bool,
    options: CommonOptions,
) -> FlowJob:
    """The caption flow's job (fills in the provider's default chat model)."""
    from tasks.jobs.caption import CaptionJob
    from tasks.jobs.media import base_dir_of

    choice = _choose(model, "caption", default_model(options.provider, "chat"), output, options)
    job = CaptionJob(
        model=choice.model,
        image_col=image_col,
        prompt=prompt,
        max_side=max_side,
        base_dir=base_dir_of(input),
        media=media_policy(input, media_root, allow_media_scheme, allow_private_urls),
    )
    arguments = {"input": input, "output": output, "image_col": image_col, "prompt": prompt, "model": choice.model}
    arguments |= {"max_side": max_side, "media_root": media_root, "allow_media_scheme": allow_media_scheme}
    arguments |= {"allow_private_urls": allow_private_urls}
    return FlowJob(job, input, output, options, arguments, choice.source)


def transcribe_job(
    input: str,
    output: str,
    audio_col: str,
    model: str | None,
    prompt: str | None,
    api: str,
    max_inline_bytes: int,
    segment_s: float,
    segment_format: str,
    media_root: list[str] | None,
    allow_media_scheme: list[str] | None,
    allow_private_urls: bool,
    options: CommonOptions,
) -> FlowJob:
    """The transcribe flow's job (fills in the default model for the chosen API)."""
    from tasks.jobs.media import base_dir_of
    from tasks.jobs.transcribe import DEFAULT_TRANSCRIPTIONS_MODEL, TranscribeJob

    default = DEFAULT_TRANSCRIPTIONS_MODEL if api == "transcriptions" else default_model(options.provider, "chat")
    choice = _choose(model, "transcribe", default, output, options)
    job = TranscribeJob(
        model=choice.model, audio_col=audio_col, prompt=prompt, api=api, max_inline_bytes=max_inline_bytes,
        base_dir=base_dir_of(input), segment_s=segment_s, segment_format=segment_format,
        media=media_policy(input, media_root, allow_media_scheme, allow_private_urls),
    )  # fmt: skip
    arguments = {"input": input, "output": output, "audio_col": audio_col, "model": choice.model, "prompt": prompt}
    arguments |= {"api": api, "max_inline_bytes": max_inline_bytes, "segment_s": segment_s}
    arguments |= {"segment_format": segment_format, "media_root": media_root}
    arguments |= {"allow_media_scheme": allow_media_scheme, "allow_private_urls": allow_private_urls}
    return FlowJob(job, input, output, options, arguments, choice.source)


def media_policy(
    input: str, media_root: list[str] | None, allow_media_scheme: list[str] | None, allow_private_urls: bool
) -> MediaPolicy:
    """Where the files named in a media column may be: under the input's folder (or prefix) and any
    --media-root, URLs of an --allow-media-scheme anywhere. Refuses, before anything is sent, a scheme
    whose filesystem package is not installed (one message rather than an error row per cell)."""
    from tasks.jobs.media_access import HTTP_SCHEMES, UNKNOWN, MediaPolicy, missing_package, scheme_of

    roots = tuple(media_root or ())
    schemes = tuple(s.lower().strip().removesuffix("://") for s in allow_media_scheme or ())
    for scheme in dict.fromkeys((*schemes, *(scheme_of(r) for r in roots))):
        if scheme in (*HTTP_SCHEMES, "file"):
            continue
        missing = missing_package(scheme)
        if missing and missing.startswith(UNKNOWN):
            raise ConfigError(f"--allow-media-scheme / --media-root: {scheme}:// is not a scheme gembatch can read")
        if missing:
            raise ConfigError(
                f"media {scheme}:// URLs are allowed (--allow-media-scheme / --media-root), but reading them needs "
                f"a package that is not installed: {missing}; install it, or drop the option"
            )
    return MediaPolicy.for_input(input, roots=roots, schemes=schemes, allow_private=allow_private_urls)


def images_job(
    input: str,
    output: str,
    prompt_col: str,
    model: str | None,
    size: str,
    n: int,
    quality: str | None,
    options: CommonOptions,
) -> FlowJob:
    """The images flow's job (fills in the provider's default model; refuses a size, n, quality or model
    the provider's images route doesn't take, before any request)."""
    from tasks.jobs.image_models import GEMINI_ROUTE, OPENAI_ROUTE
    from tasks.jobs.images import ImagesJob

    choice = _choose(model, "images", default_model(options.provider, "images"), output, options)
    route = None  # another server (--base-url): any model name goes
    if not options.base_url:
        route = OPENAI_ROUTE if options.provider == "openai" else GEMINI_ROUTE  # local emulates Gemini's
    job = ImagesJob(
        model=choice.model, output=output, prompt_col=prompt_col, size=size, n=n, quality=quality, route=route
    )
    arguments = {"input": input, "output": output, "prompt_col": prompt_col, "model": choice.model}
    arguments |= {"size": size, "n": n, "quality": quality}
    return FlowJob(job, input, output, options, arguments, choice.source)
