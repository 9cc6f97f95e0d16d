"""POST embeddings: vectors for up to 100 texts, as floats or base64."""

from __future__ import annotations

import base64
import json

from emulator import fakes
from emulator.bodies import model_of, parse_json
from emulator.config import EmulatorConfig
from emulator.errors import invalid, model_not_found
from emulator.faults import check_markers
from emulator.state import ServerState
from emulator.wire import Request, Response

MAX_EMBEDDING_INPUTS = 100


async def handle(state: ServerState, req: Request, _arg: str, cfg: EmulatorConfig) -> Response:
    body = parse_json(req)
    if cfg.ignore_params:
        body = {k: v for k, v in body.items() if k not in cfg.ignore_params}
    model = model_of(body)
    if not cfg.serves(model) or model not in fakes.EMBEDDING_MODELS:
        raise model_not_found(model, "embedContent")
    answering = cfg.answered_by(model)
    if answering not in fakes.EMBEDDING_MODELS:
        answering = model
    raw = body.get("input")
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        texts = raw
    elif isinstance(raw, list) and raw:
        raise invalid("input: token arrays are not supported; send strings.")
    else:
        raise invalid("input: expected a non-empty string or a non-empty list of strings.")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise invalid(
            f"BatchEmbedContentsRequest.requests: at most {MAX_EMBEDDING_INPUTS} requests can be in one batch"
        )
    full = fakes.EMBEDDING_MODELS[answering]
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= full):
        raise invalid(f"dimensions: must be an integer between 1 and {full} for {model}, got {dims!r}.")
    max_tokens = fakes.embedding_max_tokens(answering)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise invalid(f"encoding_format: must be 'float' or 'base64', got {fmt!r}.")
    counts = [fakes.count_tokens(t) for t in texts]
    for i, n in enumerate(counts):
        if n > max_tokens:
            raise invalid(
                f"BatchEmbedContentsRequest.requests[{i}]: input {i} has {n} tokens, more than the "
                f"maximum of {max_tokens}."
            )
    check_markers(state, texts)
    tokens = sum(counts)
    state.limiter.check(model, tokens, cfg)

    matrix = fakes.fake_embeddings(texts, answering, dims)
    chunks: list[bytes] = [b'{"object":"list","data":[']
    for i, row in enumerate(matrix):
        if fmt == "base64":
            value = b'"' + base64.b64encode(row.tobytes()) + b'"'
        else:
            value = json.dumps(row.tolist()).encode()
        sep = b"," if i else b""
        chunks.append(sep + b'{"object":"embedding","index":%d,"embedding":' % i + value + b"}")
    tail = {"model": answering, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    chunks.append(b"]," + json.dumps(tail, separators=(",", ":")).encode()[1:])
    state.bump("embedding_inputs", len(texts))
    state.bump("prompt_tokens", tokens)
    return Response(200, chunks)
