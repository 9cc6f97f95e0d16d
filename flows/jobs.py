"""Each job's object, built from its flow's (or command's) parameters — no Prefect here.

The flows build their job with these, and so does the command line before it decides whether to start
a flow run at all: the checks that need no server (key, input, columns, the --schema import) and an
untracked run need the job but not Prefect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tasks.errors import ConfigError
from tasks.provider.catalog import default_model

if TYPE_CHECKING:
    from tasks.jobs.caption import CaptionJob
    from tasks.jobs.embed import EmbedJob
    from tasks.jobs.extract import ExtractJob
    from tasks.jobs.generate import GenerateJob
    from tasks.jobs.images import ImagesJob
    from tasks.jobs.media_access import MediaPolicy
    from tasks.jobs.tools import ToolsExtractJob
    from tasks.jobs.transcribe import TranscribeJob

# Each builder imports only its own job's module (Pillow for caption, pydantic models for extract…).

__all__ = ["caption_job", "embed_job", "extract_job", "generate_job", "images_job", "transcribe_job"]


def choose_model(parameters: dict[str, Any], job: str, default: str) -> str:
    """The model of this run, recorded in ``parameters["model"]``: --model if given; else the model the
    output was made with (a scheduled run keeps its model when gembatch's default changes); else
    ``default``. With --change-model and no --model: ``default`` (today's), whatever the output holds."""
    given = parameters.get("model")
    if given:
        parameters["model_from"] = "--model"
    else:
        owner = None if parameters.get("change_model") else _output_owner(parameters.get("output"))
        if owner is not None and owner.get("job") == job and owner.get("model"):
            parameters["model"], parameters["model_from"] = owner["model"], "output"
        else:
            parameters["model"], parameters["model_from"] = default, "default"
    return parameters["model"]


def _output_owner(output: str | None) -> dict[str, Any] | None:
    if not output:
        return None
    from tasks.engine.store.output import OutputStore

    try:
        return OutputStore(output).owner()
    except (OSError, ValueError):
        return None  # the run's own checks of the folder say what is wrong with it


def embed_job(parameters: dict[str, Any]) -> EmbedJob:
    """The job for these flow parameters (fills in the provider's default model)."""
    from tasks.jobs.embed import EmbedJob

    choose_model(parameters, "embed", default_model(parameters["provider"], "embed"))
    return EmbedJob(
        model=parameters["model"],
        text_col=parameters["text_col"],
        dimensions=parameters["dimensions"],
        batch_size=parameters["batch_size"],
    )


def extract_job(parameters: dict[str, Any]) -> ExtractJob | ToolsExtractJob:
    """The job for these flow parameters (imports the schema(s), reads the prompt file, fills the model).

    ``--via tools`` (or several --schema) is function calling: :mod:`tasks.jobs.tools`."""
    from schemas.dialects import auto_dialect
    from tasks.jobs.extract import ExtractJob, import_model
    from tasks.jobs.tools import VIAS, ToolsExtractJob

    choose_model(parameters, "extract", default_model(parameters["provider"], "chat"))
    prompt, prompt_file = parameters.get("prompt"), parameters.get("prompt_file")
    if prompt is not None and prompt_file is not None:
        raise ConfigError("--prompt and --prompt-file both given: pass only one")
    if prompt_file is not None:
        prompt = _read_prompt(prompt_file)
    refs = parameters["schema_ref"]
    refs = [refs] if isinstance(refs, str) else list(refs)
    via = parameters.get("via") or "json_schema"
    if via not in VIAS:
        raise ConfigError(f"--via {via!r}: use json_schema (response_format) or tools (function calling)")
    if not refs:
        raise ConfigError("extract needs --schema MODULE:Model (e.g. schemas.examples:Invoice)")
    if len(refs) > 1 and via != "tools":
        raise ConfigError(
            f"{len(refs)} --schema given: choosing among several schemas (triage) works through function calling; "
            "add --via tools, or pass one --schema"
        )
    common = {
        "model": parameters["model"],
        "text_col": parameters["text_col"],
        "prompt": prompt,
        "reasoning_effort": parameters.get("reasoning_effort"),
        "schema_dialect": parameters.get("schema_dialect")
        or auto_dialect(parameters.get("provider", "gemini"), parameters.get("base_url")),
    }
    if via == "tools":
        job: ExtractJob | ToolsExtractJob = ToolsExtractJob(schemas=tuple(import_model(r) for r in refs), **common)
    else:
        job = ExtractJob(schema=import_model(refs[0]), **common)
    id_col = parameters.get("id_col", "id")
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
    return job


def generate_job(parameters: dict[str, Any]) -> GenerateJob:
    """The job for these flow parameters (reads the template file, fills in the default chat model)."""
    from tasks.jobs.generate import GenerateJob

    choose_model(parameters, "generate", default_model(parameters["provider"], "chat"))
    prompt, prompt_file = parameters.get("prompt"), parameters.get("prompt_file")
    if prompt is not None and prompt_file is not None:
        raise ConfigError("--prompt and --prompt-file both given: pass only one")
    if prompt_file is not None:
        prompt = _read_prompt(prompt_file)
    if prompt is None:
        raise ConfigError(
            "generate needs a prompt template: --prompt 'Summarise in one line: {text}' or --prompt-file FILE "
            "(column names in braces are filled from each row)"
        )
    return GenerateJob(
        model=parameters["model"],
        prompt=prompt,
        system=parameters.get("system"),
        temperature=parameters.get("temperature"),
        max_tokens=parameters.get("max_tokens"),
        reasoning_effort=parameters.get("reasoning_effort"),
        n=parameters.get("n", 1),
        id_col=parameters.get("id_col", "id"),
    )


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


def caption_job(parameters: dict[str, Any]) -> CaptionJob:
    """The job for these flow parameters (fills in the provider's default chat model)."""
    from tasks.jobs.caption import CaptionJob
    from tasks.jobs.media import base_dir_of

    choose_model(parameters, "caption", default_model(parameters["provider"], "chat"))
    return CaptionJob(
        model=parameters["model"],
        image_col=parameters["image_col"],
        prompt=parameters["prompt"],
        max_side=parameters["max_side"],
        base_dir=base_dir_of(parameters["input"]),
        media=media_policy(parameters),
    )


def transcribe_job(parameters: dict[str, Any]) -> TranscribeJob:
    """The job for these flow parameters (fills in the default model for the chosen API)."""
    from tasks.defaults import DEFAULT_SEGMENT_FORMAT, DEFAULT_SEGMENT_S
    from tasks.jobs.media import base_dir_of
    from tasks.jobs.transcribe import DEFAULT_TRANSCRIPTIONS_MODEL, TranscribeJob

    api = parameters.get("api", "chat")
    default = DEFAULT_TRANSCRIPTIONS_MODEL if api == "transcriptions" else default_model(parameters["provider"], "chat")
    choose_model(parameters, "transcribe", default)
    return TranscribeJob(
        model=parameters["model"],
        audio_col=parameters["audio_col"],
        prompt=parameters["prompt"],
        api=parameters["api"],
        max_inline_bytes=parameters["max_inline_bytes"],
        base_dir=base_dir_of(parameters["input"]),
        segment_s=parameters.get("segment_s", DEFAULT_SEGMENT_S),
        segment_format=parameters.get("segment_format", DEFAULT_SEGMENT_FORMAT),
        media=media_policy(parameters),
    )


def media_policy(parameters: dict[str, Any]) -> MediaPolicy:
    """Where the files named in a media column may be: under the input's folder (or prefix) and any
    --media-root, URLs of an --allow-media-scheme anywhere. Refuses, before anything is sent, a scheme
    whose filesystem package is not installed (one message rather than an error row per cell)."""
    from tasks.jobs.media_access import HTTP_SCHEMES, UNKNOWN, MediaPolicy, missing_package, scheme_of

    roots = tuple(parameters.get("media_root") or ())
    schemes = tuple(s.lower().strip().removesuffix("://") for s in parameters.get("allow_media_scheme") or ())
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
    return MediaPolicy.for_input(
        parameters["input"], roots=roots, schemes=schemes, allow_private=bool(parameters.get("allow_private_urls"))
    )


def images_job(parameters: dict[str, Any]) -> ImagesJob:
    """The job for these flow parameters (fills in the provider's default model; refuses a size, n,
    quality or model the provider's images route doesn't take, before any request)."""
    from tasks.jobs.image_models import GEMINI_ROUTE, OPENAI_ROUTE
    from tasks.jobs.images import ImagesJob

    provider = parameters["provider"]
    choose_model(parameters, "images", default_model(provider, "images"))
    route = None  # another server (--base-url): any model name goes
    if not parameters.get("base_url"):
        route = OPENAI_ROUTE if provider == "openai" else GEMINI_ROUTE  # local emulates Gemini's
    return ImagesJob(
        model=parameters["model"],
        output=parameters["output"],
        prompt_col=parameters["prompt_col"],
        size=parameters["size"],
        n=parameters["n"],
        quality=parameters.get("quality"),
        route=route,
    )
