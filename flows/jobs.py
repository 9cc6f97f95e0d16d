"""Each job's object, built from its flow's (or command's) parameters — no Prefect here.

The flows build their job with these, and so does the command line before it decides whether to start
a flow run at all: the checks that need no server (key, input, columns, the --schema import) and an
untracked run need the job but not Prefect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tasks.errors import ConfigError
from tasks.provider.prices import default_model

if TYPE_CHECKING:
    from tasks.jobs.caption import CaptionJob
    from tasks.jobs.embed import EmbedJob
    from tasks.jobs.extract import ExtractJob
    from tasks.jobs.images import ImagesJob
    from tasks.jobs.transcribe import TranscribeJob

# Each builder imports only its own job's module (Pillow for caption, pydantic models for extract…).

__all__ = ["caption_job", "embed_job", "extract_job", "images_job", "transcribe_job"]


def embed_job(parameters: dict[str, Any]) -> EmbedJob:
    """The job for these flow parameters (fills in the provider's default model)."""
    from tasks.jobs.embed import EmbedJob

    parameters["model"] = parameters.get("model") or default_model(parameters["provider"], "embed")
    return EmbedJob(
        model=parameters["model"],
        text_col=parameters["text_col"],
        dimensions=parameters["dimensions"],
        batch_size=parameters["batch_size"],
    )


def extract_job(parameters: dict[str, Any]) -> ExtractJob:
    """The job for these flow parameters (imports the schema, reads the prompt file, fills the model)."""
    from schemas.dialects import auto_dialect
    from tasks.jobs.extract import ExtractJob, import_model

    parameters["model"] = parameters.get("model") or default_model(parameters["provider"], "chat")
    prompt, prompt_file = parameters.get("prompt"), parameters.get("prompt_file")
    if prompt is not None and prompt_file is not None:
        raise ConfigError("--prompt and --prompt-file both given: pass only one")
    if prompt_file is not None:
        prompt = _read_prompt(prompt_file)
    job = ExtractJob(
        model=parameters["model"],
        schema=import_model(parameters["schema_ref"]),
        text_col=parameters["text_col"],
        prompt=prompt,
        reasoning_effort=parameters.get("reasoning_effort"),
        schema_dialect=parameters.get("schema_dialect")
        or auto_dialect(parameters.get("provider", "gemini"), parameters.get("base_url")),
    )
    id_col = parameters.get("id_col", "id")
    if any(f.name == id_col for f in job.mapping.fields):
        raise ConfigError(
            f"{job.schema.__name__}.{id_col}: the output's id column is also called {id_col!r}; rename the field "
            "or pass another --id-col"
        )
    return job


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

    parameters["model"] = parameters.get("model") or default_model(parameters["provider"], "chat")
    return CaptionJob(
        model=parameters["model"],
        image_col=parameters["image_col"],
        prompt=parameters["prompt"],
        max_side=parameters["max_side"],
        base_dir=base_dir_of(parameters["input"]),
    )


def transcribe_job(parameters: dict[str, Any]) -> TranscribeJob:
    """The job for these flow parameters (fills in the default model for the chosen API)."""
    from tasks.defaults import DEFAULT_SEGMENT_FORMAT, DEFAULT_SEGMENT_S
    from tasks.jobs.media import base_dir_of
    from tasks.jobs.transcribe import DEFAULT_TRANSCRIPTIONS_MODEL, TranscribeJob

    if not parameters.get("model"):
        api = parameters.get("api", "chat")
        parameters["model"] = (
            DEFAULT_TRANSCRIPTIONS_MODEL if api == "transcriptions" else default_model(parameters["provider"], "chat")
        )
    return TranscribeJob(
        model=parameters["model"],
        audio_col=parameters["audio_col"],
        prompt=parameters["prompt"],
        api=parameters["api"],
        max_inline_bytes=parameters["max_inline_bytes"],
        base_dir=base_dir_of(parameters["input"]),
        segment_s=parameters.get("segment_s", DEFAULT_SEGMENT_S),
        segment_format=parameters.get("segment_format", DEFAULT_SEGMENT_FORMAT),
    )


def images_job(parameters: dict[str, Any]) -> ImagesJob:
    """The job for these flow parameters (fills in the provider's default model; refuses a size, n,
    quality or model the provider's images route doesn't take, before any request)."""
    from tasks.jobs.image_models import GEMINI_ROUTE, OPENAI_ROUTE
    from tasks.jobs.images import ImagesJob

    provider = parameters["provider"]
    parameters["model"] = parameters.get("model") or default_model(provider, "images")
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
