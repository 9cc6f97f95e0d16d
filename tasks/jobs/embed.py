"""The embeddings job: many texts per `embeddings.create` request, vectors as fixed-size float32 lists."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from openai.types import CreateEmbeddingResponse

from tasks.defaults import MAX_INPUTS_PER_REQUEST
from tasks.engine.job import BadReply, Item, Prepared, Reply, RowInvalid, result_schema, unexpected_reply
from tasks.engine.plan.hashing import non_blank
from tasks.errors import ConfigError, RunStopped
from tasks.provider.client import Connection

__all__ = ["DIMENSIONS_DROPPED", "EmbedJob", "EMBEDDING_MODELS", "MAX_INPUTS_PER_REQUEST"]

DIMENSIONS_DROPPED = "failed: parameter dropped"


@dataclass(frozen=True)
class EmbeddingModel:
    dims: int
    max_input_tokens: int


EMBEDDING_MODELS: dict[str, EmbeddingModel] = {
    # 128-3072 dims through `dimensions`, about 8,192 tokens per input (Gemini models page, 2026-12-06).
    "gemini-embedding-2": EmbeddingModel(dims=3072, max_input_tokens=8192),
    "gemini-embedding-001": EmbeddingModel(dims=3072, max_input_tokens=2048),
    "text-embedding-3-small": EmbeddingModel(dims=1536, max_input_tokens=8191),
    "text-embedding-3-large": EmbeddingModel(dims=3072, max_input_tokens=8191),
}
UNKNOWN_MODEL_MAX_TOKENS = 2048


def estimate_text_tokens(text: str) -> int:
    """About four characters a token: close enough to budget TPM; responses correct it."""
    return max(1, (len(text) + 3) // 4)


@dataclass(frozen=True, kw_only=True)
class EmbedJob:
    model: str
    text_col: str = "text"
    dimensions: int | None = None
    batch_size: int = MAX_INPUTS_PER_REQUEST

    name = "embed"
    # A reply that names another model stops the run before its vectors are written (tasks/engine/send/send_rows.py):
    # an index of one model's vectors must not take another's.
    stop_on_reroute = True
    # prepare()'s fields are the same for every row but this one, the text as-is: see tasks/engine/plan/hashing.py.
    hash_text_field = "input"

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"--dimensions must be at least 1, got {self.dimensions}")

    @property
    def input_columns(self) -> tuple[str, ...]:
        return (self.text_col,)

    @property
    def string_columns(self) -> tuple[str, ...]:
        return (self.text_col,)

    @property
    def max_items_per_request(self) -> int:
        return min(self.batch_size, MAX_INPUTS_PER_REQUEST)

    @property
    def spec(self) -> EmbeddingModel | None:
        return EMBEDDING_MODELS.get(self.model.removeprefix("models/"))

    @cached_property
    def max_input_tokens(self) -> int:
        return self.spec.max_input_tokens if self.spec else UNKNOWN_MODEL_MAX_TOKENS

    @property
    def normalise(self) -> bool:
        """Gemini only normalises its full-size output: shortened vectors are normalised here."""
        spec = self.spec
        return self.dimensions is not None and (spec is None or self.dimensions < spec.dims)

    def parameters(self) -> dict[str, Any]:
        return {
            "text_col": self.text_col,
            "dimensions": self.dimensions,
            "batch_size": self.max_items_per_request,
            "normalised_here": self.normalise,
        }

    def prepare(self, payload: dict[str, Any]) -> Prepared:
        text = payload[self.text_col]
        if text is None:
            raise RowInvalid(f"column {self.text_col!r} is null: nothing to embed; fill it or drop the row")
        if not text or text.isspace():
            raise RowInvalid(f"column {self.text_col!r} is empty: nothing to embed; fill it or drop the row")
        limit = self.max_input_tokens
        tokens = max(1, (len(text) + 3) // 4)  # estimate_text_tokens, inlined: this runs for every row
        if tokens > limit:
            raise RowInvalid(
                f"text is about {tokens} tokens ({len(text)} characters), over {self.model}'s "
                f"{limit}-token input limit: split it into smaller passages"
            )
        fields = {"job": "embed", "model": self.model, "dimensions": self.dimensions, "input": text}
        return Prepared(fields, tokens, text)

    def surely_valid(self, texts: pa.Array) -> np.ndarray:
        """Rows :meth:`prepare` accepts (not null, not blank, within the token limit), all at once."""
        longest = 4 * self.max_input_tokens - 3  # estimate_text_tokens(text) <= limit
        fits = pc.less_equal(pc.utf8_length(texts), longest).fill_null(False).to_numpy(zero_copy_only=False)
        return fits & non_blank(texts)

    async def send(self, conn: Connection, items: list[Item]) -> Reply:
        extra = {"dimensions": self.dimensions} if self.dimensions is not None else {}
        response = await conn.client.embeddings.create(
            model=self.model,
            input=[item.prepared.data for item in items],
            encoding_format="base64",
            **extra,
        )
        if not isinstance(response, CreateEmbeddingResponse):
            raise unexpected_reply(response, "an embeddings object")
        vectors: list[np.ndarray | None] = [None] * len(items)
        for entry in response.data:
            vectors[entry.index] = self._vector(entry.embedding)
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            raise BadReply(f"the reply had no embedding for inputs {missing[:5]}")
        usage = response.usage
        prompt = usage.prompt_tokens if usage else 0
        return Reply(
            results=vectors,
            prompt_tokens=prompt,
            total_tokens=usage.total_tokens if usage else 0,
            served_model=getattr(response, "model", None) or None,
        )

    def check_output(self, store: Any) -> None:
        """An output holds vectors of one size: a run that would add vectors of another is refused before
        any request (Arrow reads a folder whose parts disagree on the size as no table at all)."""
        import pyarrow.parquet as pq

        asked = self.dimensions or (self.spec.dims if self.spec else None)
        files = store.result_files()
        if asked is None or not files:
            return
        with store.fs.open(files[0], "rb") as f:
            schema = pq.ParquetFile(f).schema_arrow
        field = schema.field("embedding") if "embedding" in schema.names else None
        size = getattr(field.type, "list_size", None) if field is not None else None
        if size is None or size == asked:
            return
        how = f"--dimensions {self.dimensions}" if self.dimensions else f"{self.model}'s full size, no --dimensions"
        full = self.spec.dims if self.spec else None
        keep = "without --dimensions" if size == full else f"with --dimensions {size}"
        fits = "" if full is not None and size > full else f", or rerun {keep} to add to this one"
        raise ConfigError(
            f"output {store.url} holds vectors of {size} values, and this run asks for vectors of {asked} "
            f"({how}): one output holds vectors of one size. Write them to another --output{fits}; or pass "
            "--force to write them here anyway (every row is sent again at the new size and its old vector "
            "superseded; until the run completes, the folder holds both sizes). Nothing was sent."
        )

    def stop_for(self, reply: Reply, output: str) -> RunStopped | None:
        """A reply whose vectors don't have the size --dimensions asked for stops the run before any of it
        is written: the server, or a gateway before it, dropped the parameter without a word (a LiteLLM
        proxy with ``drop_params: true``), and an output's vectors must all have the size asked for."""
        if self.dimensions is None:
            return None
        served = sorted({len(v) for v in reply.results if isinstance(v, np.ndarray)} - {self.dimensions})
        if not served:
            return None
        sizes = " and ".join(str(n) for n in served)
        return RunStopped(
            DIMENSIONS_DROPPED,
            f"the run asked for vectors of {self.dimensions} values (--dimensions {self.dimensions}) and the "
            f"server answered with vectors of {sizes} values: it, or a gateway before it (a LiteLLM proxy with "
            "`drop_params: true`), dropped the dimensions parameter without a word. Nothing of that reply was "
            f"written into {output} and no row was marked failed. Ways out: rerun without --dimensions into "
            f"another --output (the vectors then come at the model's full size, {sizes}, and are not shortened); "
            "or have the gateway pass dimensions on to the model (LiteLLM: list it in the model's "
            "`allowed_openai_params`, or turn drop_params off) and rerun the same command. Rows already done "
            "are kept",
        )

    def _vector(self, raw: Any) -> np.ndarray:
        # Servers that honour encoding_format send base64 float32; others (Gemini, maybe) send lists.
        if isinstance(raw, str):
            vector = np.frombuffer(base64.b64decode(raw), dtype="<f4").astype(np.float32)
        else:
            vector = np.asarray(raw, dtype=np.float32)
        if self.normalise:
            norm = float(np.linalg.norm(vector))
            if norm > 0:
                vector = (vector / norm).astype(np.float32)
        return vector

    def output_schema(self, id_col: str, id_type: pa.DataType, dims: int | None = None) -> pa.Schema:
        dims = dims or self.dimensions or (self.spec.dims if self.spec else None)
        if dims is None:
            raise ValueError("embedding size unknown: pass --dimensions")
        return result_schema(id_col, id_type, [pa.field("embedding", pa.list_(pa.float32(), dims))], served_model=False)

    def result_arrays(self, results: list[Any]) -> dict[str, pa.Array]:
        dims = {len(v) for v in results}
        if len(dims) != 1:
            raise BadReply(f"the server returned vectors of different sizes: {sorted(dims)}")
        (size,) = dims
        flat = pa.array(np.concatenate(results).astype(np.float32, copy=False), pa.float32())
        return {"embedding": pa.FixedSizeListArray.from_arrays(flat, size)}

    def results_from_table(self, table: pa.Table) -> dict[str, Any]:
        if table.num_rows == 0:
            return {}
        column = table.column("embedding").combine_chunks()
        size = column.type.list_size
        matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, size)
        return {h: matrix[i].copy() for i, h in enumerate(table.column("content_hash").to_pylist())}
