from __future__ import annotations

import asyncio
import base64
import datetime as dt
import http.client
import io
import json
import struct
import time
import wave
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import openai
import pydantic
import pytest

from emulator import Emulator, EmulatorConfig
from emulator.fake_json import fake_json_for_schema
from emulator.fakes import (
    EMBEDDING_MODELS,
    audio_seconds,
    count_tokens,
    fake_caption,
    fake_chat_text,
    fake_embedding,
    fake_png,
    fake_transcript,
    image_size,
)

KEY = "emulator-key"
EMB = "gemini-embedding-001"
CHAT = "gemini-3.8-flash"


@pytest.fixture
def make_emu() -> Iterator[Any]:
    started: list[Emulator] = []

    def make(**config: Any) -> Emulator:
        emu = Emulator(EmulatorConfig(**config)).start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        emu.stop()


@pytest.fixture
def emu(make_emu: Any) -> Emulator:
    return make_emu()


def client(emu: Emulator, **kw: Any) -> openai.OpenAI:
    kw.setdefault("api_key", KEY)
    kw.setdefault("timeout", 5.0)
    return openai.OpenAI(base_url=emu.base_url, max_retries=0, **kw)


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    assert isinstance(exc.body, list), exc.body
    return exc.body[0]["error"]


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x01\x00" * int(rate * seconds))
    return buf.getvalue()


def png_ihdr(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def raw_request(
    emu: Emulator, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    try:
        hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# fakes


def test_fakes_are_deterministic_and_shaped() -> None:
    assert count_tokens("") == 1
    assert count_tokens("abcd") == 1
    assert count_tokens("abcde") == 2
    full = fake_embedding("hello", EMB)
    assert full.dtype == np.float32 and full.shape == (3072,)
    assert abs(float(np.linalg.norm(full.astype(np.float64))) - 1.0) < 1e-5
    assert np.array_equal(full, fake_embedding("hello", EMB, 3072))
    small = fake_embedding("hello", EMB, 256)
    assert small.shape == (256,) and abs(float(np.linalg.norm(small)) - 1.0) > 0.1
    assert float(small.min()) >= -1.0 and float(small.max()) < 1.0
    assert fake_embedding("hello", "text-embedding-3-small").shape == (EMBEDDING_MODELS["text-embedding-3-small"],)
    assert not np.array_equal(fake_embedding("hello", EMB), fake_embedding("hello!", EMB))
    with pytest.raises(ValueError):
        fake_embedding("x", "no-such-model")
    assert fake_chat_text(CHAT, "hi") == fake_chat_text(CHAT, "hi") != fake_chat_text(CHAT, "ho")


def test_image_and_audio_header_parsers() -> None:
    png = fake_png("a cat", 33, 17)
    assert png_ihdr(png) == (33, 17) == image_size(png)
    jpeg = b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", 480, 640) + b"\x00" * 12
    assert image_size(jpeg) == (640, 480)
    assert "640x480" in fake_caption(jpeg, "image/jpeg", CHAT, "")
    assert audio_seconds(wav_bytes(1.5), "wav") == pytest.approx(1.5)
    assert audio_seconds(b"ID3\x00not a wav", "mp3") is None


class Address(pydantic.BaseModel):
    street: str
    postcode: str = pydantic.Field(max_length=6)


class Person(pydantic.BaseModel):
    name: str
    age: int = pydantic.Field(ge=18, le=30)
    score: float = pydantic.Field(gt=0, lt=1)
    born: dt.date
    seen: dt.datetime
    kind: Literal["a", "b"]
    tags: list[str]
    home: Address
    work: Address | None = None
    others: list[Address] = pydantic.Field(min_length=2)
    counts: dict[str, int]


def test_fake_json_for_schema_is_valid_and_deterministic() -> None:
    schema = Person.model_json_schema()
    for seed in ("one", "two", "three", "four"):
        value = fake_json_for_schema(schema, seed)
        person = Person.model_validate_json(json.dumps(value))
        assert person.work is not None
        assert 1 <= len(person.tags) <= 3
        assert value == fake_json_for_schema(schema, seed)
    assert fake_json_for_schema(schema, "one") != fake_json_for_schema(schema, "two")
    assert fake_json_for_schema({"type": ["string", "null"], "format": "date"}, "s") is not None
    dt.date.fromisoformat(str(fake_json_for_schema({"type": "string", "format": "date"}, "s")))


def test_fake_png_is_fast_for_large_images() -> None:
    start = time.perf_counter()
    png = fake_png("big", 1024, 1024)
    assert time.perf_counter() - start < 0.5
    assert png_ihdr(png) == (1024, 1024)
    assert fake_png("big", 8, 8) != fake_png("big#1", 8, 8)


# ---------------------------------------------------------------------------------------------
# embeddings


def test_embeddings_default_base64_matches_fakes(emu: Emulator) -> None:
    texts = [f"row {i}" for i in range(100)]
    resp = client(emu).embeddings.create(model=EMB, input=texts)
    assert len(resp.data) == 100
    for item, text in zip(resp.data, texts, strict=True):
        assert np.array_equal(np.asarray(item.embedding, dtype=np.float32), fake_embedding(text, EMB))
    assert resp.usage.prompt_tokens == sum(count_tokens(t) for t in texts)
    assert emu.stats["embedding_inputs"] == 100


def test_embeddings_float_with_dimensions(emu: Emulator) -> None:
    resp = client(emu).embeddings.create(model=EMB, input="hello", dimensions=256, encoding_format="float")
    got = np.asarray(resp.data[0].embedding, dtype=np.float32)
    assert np.array_equal(got, fake_embedding("hello", EMB, 256))


def test_embeddings_explicit_base64_and_raw_float(emu: Emulator) -> None:
    resp = client(emu).embeddings.create(model=EMB, input=["a", "b"], encoding_format="base64", dimensions=3072)
    raw = resp.data[1].embedding
    assert isinstance(raw, str)
    assert np.array_equal(np.frombuffer(base64.b64decode(raw), dtype="<f4"), fake_embedding("b", EMB))
    status, _, body = raw_request(
        emu, "POST", "/v1beta/openai/embeddings", json.dumps({"model": EMB, "input": "a"}).encode()
    )
    assert status == 200
    doc = json.loads(body)
    assert doc["object"] == "list" and doc["model"] == EMB
    assert np.array_equal(np.asarray(doc["data"][0]["embedding"], dtype=np.float32), fake_embedding("a", EMB))


def test_embeddings_input_validation(emu: Emulator) -> None:
    c = client(emu)
    with pytest.raises(openai.BadRequestError) as too_many:
        c.embeddings.create(model=EMB, input=["x"] * 101)
    err = error_of(too_many.value)
    assert err["status"] == "INVALID_ARGUMENT"
    assert "at most 100 requests can be in one batch" in err["message"]
    with pytest.raises(openai.BadRequestError) as too_long:
        c.embeddings.create(model=EMB, input=["short", "x" * (4 * 2048 + 1)])
    assert "requests[1]" in error_of(too_long.value)["message"]
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model=EMB, input=[[1, 2, 3]])
    assert emu.stats["embedding_inputs"] == 0


def test_wrong_key_is_400_api_key_invalid(emu: Emulator) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client(emu, api_key="wrong").embeddings.create(model=EMB, input="x")
    err = error_of(exc.value)
    assert err["code"] == 400 and err["status"] == "INVALID_ARGUMENT"
    assert [d.get("reason") for d in err["details"] if "ErrorInfo" in d["@type"]] == ["API_KEY_INVALID"]
    status, _, _ = raw_request(emu, "GET", "/v1beta/openai/models", headers={"Authorization": ""})
    assert status == 400


def test_unknown_model_is_404(emu: Emulator) -> None:
    c = client(emu)
    with pytest.raises(openai.NotFoundError) as exc:
        c.embeddings.create(model="text-embedding-004", input="x")
    assert "text-embedding-004" in error_of(exc.value)["message"]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gemini-1.0-pro", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gemini-1.0-pro")


# ---------------------------------------------------------------------------------------------
# rate limits


def test_rpm_limit_gives_gemini_429(make_emu: Any) -> None:
    emu = make_emu(rpm=2, window_seconds=0.3)
    c = client(emu)
    c.embeddings.create(model=EMB, input="a")
    c.embeddings.create(model=EMB, input="b")
    with pytest.raises(openai.RateLimitError) as exc:
        c.embeddings.create(model=EMB, input="c")
    assert "retry-after" not in exc.value.response.headers
    err = error_of(exc.value)
    assert err["code"] == 429 and err["status"] == "RESOURCE_EXHAUSTED"
    by_type = {d["@type"].rsplit(".", 1)[1]: d for d in err["details"]}
    assert by_type["RetryInfo"]["retryDelay"] == "1s"
    violation = by_type["QuotaFailure"]["violations"][0]
    assert violation["quotaId"] == "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    assert violation["quotaValue"] == "2"
    assert "Please retry in 0." in err["message"]
    # Other models have their own quota, as on Gemini.
    c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    time.sleep(0.35)
    c.embeddings.create(model=EMB, input="d")
    assert emu.stats["by_status"] == {200: 4, 429: 1}


def test_rejected_requests_do_not_count(make_emu: Any) -> None:
    emu = make_emu(rpm=1, window_seconds=0.6)
    c = client(emu)
    c.embeddings.create(model=EMB, input="a")
    time.sleep(0.3)
    with pytest.raises(openai.RateLimitError):
        c.embeddings.create(model=EMB, input="b")
    time.sleep(0.35)
    c.embeddings.create(model=EMB, input="c")


def test_a_pace_holds_the_rpm_over_short_spells_too(make_emu: Any) -> None:
    """OpenAI-style: 30 a minute enforced as 5 every 10 s. A burst of 5 passes, the 6th is refused
    though the minute holds 25 more; two seconds later one more fits."""
    emu = make_emu(rpm=30, pace_seconds=10.0)
    c = client(emu)
    for i in range(5):
        c.embeddings.create(model=EMB, input=f"burst {i}")
    with pytest.raises(openai.RateLimitError) as exc:
        c.embeddings.create(model=EMB, input="one too many")
    violation = error_of(exc.value)["details"][0]["violations"][0]
    assert violation["quotaId"] == "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    time.sleep(2.05)
    c.embeddings.create(model=EMB, input="refilled")
    assert emu.stats["by_status"] == {200: 6, 429: 1}


def test_tpm_and_rpd_limits(make_emu: Any) -> None:
    emu = make_emu(tpm=10, window_seconds=5)
    c = client(emu)
    c.embeddings.create(model=EMB, input="x" * 36)  # 9 tokens
    with pytest.raises(openai.RateLimitError) as exc:
        c.embeddings.create(model=EMB, input="x" * 8)
    violation = error_of(exc.value)["details"][0]["violations"][0]
    assert violation["quotaId"] == "GenerateContentInputTokensPerModelPerMinute-FreeTier"
    assert violation["quotaMetric"].endswith("input_token_count")

    emu = make_emu(rpd=1)
    c = client(emu)
    c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as exc:
        c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    assert "PerDay" in error_of(exc.value)["details"][0]["violations"][0]["quotaId"]


# ---------------------------------------------------------------------------------------------
# chat


def test_chat_plain_text_and_usage(emu: Emulator) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is up"},
    ]
    resp = client(emu).chat.completions.create(model=CHAT, messages=messages)
    reply = resp.choices[0].message.content
    assert reply == fake_chat_text(CHAT, "what is up")
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == count_tokens("be brief") + count_tokens("what is up")
    assert resp.usage.completion_tokens == count_tokens(reply)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_json_schema_validates(emu: Emulator) -> None:
    schema = Person.model_json_schema()
    resp = client(emu).chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "describe someone"}],
        response_format={"type": "json_schema", "json_schema": {"name": "Person", "schema": schema}},
    )
    content = resp.choices[0].message.content
    assert content is not None
    Person.model_validate_json(content)
    assert json.loads(content) == fake_json_for_schema(schema, seed="describe someone")


def test_chat_image_part_gives_caption(emu: Emulator) -> None:
    png = fake_png("pic", 64, 32)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    c = client(emu)
    resp = c.chat.completions.create(
        model=CHAT,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "caption this"}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
    )
    content = resp.choices[0].message.content
    assert content == fake_caption(png, "image/png", CHAT, "caption this")
    assert "64x32" in content
    assert resp.usage is not None and resp.usage.prompt_tokens == count_tokens("caption this") + 258
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
        )


def test_chat_input_audio_gives_transcript(emu: Emulator) -> None:
    audio = wav_bytes(2.0)
    resp = client(emu).chat.completions.create(
        model=CHAT,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "transcribe"},
                    {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}},
                ],
            }
        ],
    )
    assert resp.choices[0].message.content == fake_transcript(audio, "wav", CHAT)
    assert resp.usage is not None and resp.usage.prompt_tokens == count_tokens("transcribe") + 64


def test_reasoning_effort_thinking_tokens(emu: Emulator) -> None:
    c = client(emu)
    resp = c.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "think"}], reasoning_effort="medium"
    )
    usage = resp.usage
    assert usage is not None
    assert usage.completion_tokens == count_tokens(resp.choices[0].message.content or "")
    assert usage.total_tokens - usage.prompt_tokens - usage.completion_tokens == 256
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "think"}], extra_body={"reasoning_effort": "max"}
        )
    assert error_of(exc.value)["message"].startswith("Invalid reasoning_effort: max. Valid values are:")


def test_chat_stream(emu: Emulator) -> None:
    stream = client(emu).chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == fake_chat_text(CHAT, "hi")
    assert chunks[-1].usage is not None


# ---------------------------------------------------------------------------------------------
# images, audio, models


def test_images_generate_png_of_requested_size(emu: Emulator) -> None:
    resp = client(emu).images.generate(model="gemini-nano-banana-2.1", prompt="a fox", n=2, size="256x128")
    assert resp.data is not None and len(resp.data) == 2
    pngs = [base64.b64decode(d.b64_json or "") for d in resp.data]
    assert [png_ihdr(p) for p in pngs] == [(256, 128), (256, 128)]
    assert pngs[0] == fake_png("a fox", 256, 128) and pngs[1] == fake_png("a fox#1", 256, 128)
    assert resp.data[0].revised_prompt == "[emulator] a fox"
    assert emu.stats["images"] == 2


def test_audio_transcriptions_multipart(emu: Emulator) -> None:
    audio = wav_bytes(0.5)
    resp = client(emu).audio.transcriptions.create(model="whisper-1", file=("clip.wav", audio), prompt="names")
    assert resp.text == fake_transcript(audio, "wav", "whisper-1")
    assert emu.stats["by_route"]["audio/transcriptions"] == 1


def test_models_list_and_retrieve(emu: Emulator) -> None:
    c = client(emu)
    ids = [m.id for m in c.models.list()]
    assert f"models/{CHAT}" in ids
    assert c.models.retrieve(CHAT).id == CHAT
    assert c.models.retrieve(f"models/{CHAT}").id == f"models/{CHAT}"


def test_v1_prefix(emu: Emulator) -> None:
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{emu.port}/v1/", api_key=KEY, max_retries=0)
    assert c.embeddings.create(model=EMB, input="v1").data[0].index == 0
    status, _, body = raw_request(emu, "GET", "/v2/models")
    assert status == 404 and json.loads(body)[0]["error"]["status"] == "NOT_FOUND"


# ---------------------------------------------------------------------------------------------
# HTTP details


def test_keep_alive_chunked_and_connection_close(emu: Emulator) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = json.dumps({"model": EMB, "input": ["a", "b"], "encoding_format": "float"}).encode()
    for _ in range(2):
        conn.request("POST", "/v1beta/openai/embeddings", body=body, headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200 and len(json.loads(resp.read())["data"]) == 2
    conn.request("POST", "/v1beta/openai/embeddings", body=iter([body[:10], body[10:]]), headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["data"][1]["index"] == 1
    conn.request("GET", "/v1beta/openai/models", headers={**headers, "Connection": "close"})
    resp = conn.getresponse()
    assert resp.getheader("Connection") == "close"
    resp.read()
    conn.close()
    assert emu.stats["connections"] == 1 and emu.stats["requests"] == 4


def test_latency_overlaps_concurrent_requests(make_emu: Any) -> None:
    emu = make_emu(latency_seconds=0.3)

    async def go() -> float:
        c = openai.AsyncOpenAI(base_url=emu.base_url, api_key=KEY, max_retries=0)
        start = time.perf_counter()
        await asyncio.gather(*(c.embeddings.create(model=EMB, input=f"t{i}") for i in range(8)))
        elapsed = time.perf_counter() - start
        await c.close()
        return elapsed

    elapsed = asyncio.run(go())
    assert 0.3 <= elapsed < 1.8  # one after the other would take 8 × 0.3 = 2.4 s (slack: a busy machine)
    assert emu.stats["max_in_flight"] == 8


# ---------------------------------------------------------------------------------------------
# faults


def test_random_status_faults(make_emu: Any) -> None:
    emu = make_emu(fault_rate_500=1.0)
    with pytest.raises(openai.InternalServerError) as exc:
        client(emu).embeddings.create(model=EMB, input="x")
    assert exc.value.status_code == 500 and error_of(exc.value)["status"] == "INTERNAL"
    assert client(emu).models.list().data  # GET routes are never faulted
    emu.configure(fault_rate_500=0.0, fault_rate_503=1.0)
    with pytest.raises(openai.InternalServerError) as exc:
        client(emu).chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 503 and "overloaded" in error_of(exc.value)["message"]
    assert emu.stats["faults"] == {"500": 1, "503": 1}


def test_truncate_fault(make_emu: Any) -> None:
    emu = make_emu(fault_rate_truncate=1.0)
    with pytest.raises(openai.APIConnectionError):
        client(emu).embeddings.create(model=EMB, input="x")
    assert emu.stats["faults"] == {"truncate": 1}


def test_drop_fault(make_emu: Any) -> None:
    emu = make_emu(fault_rate_drop=1.0)
    with pytest.raises(openai.APIConnectionError):
        client(emu).chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])
    assert emu.stats["faults"] == {"drop": 1}


def test_hang_fault_times_out_and_stops_cleanly(make_emu: Any) -> None:
    emu = make_emu(fault_rate_hang=1.0)
    with pytest.raises(openai.APITimeoutError):
        client(emu, timeout=0.3).embeddings.create(model=EMB, input="x")
    assert emu.stats["faults"] == {"hang": 1}
    start = time.perf_counter()
    emu.stop()
    assert time.perf_counter() - start < 1.0


def test_garbage_fault(make_emu: Any) -> None:
    emu = make_emu(fault_rate_garbage=1.0)
    # text/html: the SDK hands back the raw text instead of a parsed model.
    reply: Any = client(emu).chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])
    assert reply == "<html>oops</html>"
    emu.configure(garbage_content_type="application/json")
    with pytest.raises(json.JSONDecodeError):
        client(emu).chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])
    assert emu.stats["faults"] == {"garbage": 2}


def test_faults_are_seeded(make_emu: Any) -> None:
    def pattern(emu: Emulator) -> list[int]:
        out = []
        for i in range(20):
            status, _, _ = raw_request(
                emu, "POST", "/v1/embeddings", json.dumps({"model": EMB, "input": str(i)}).encode()
            )
            out.append(status)
        return out

    first = pattern(make_emu(fault_rate_500=0.3, fault_rate_503=0.3, seed=7))
    assert first == pattern(make_emu(fault_rate_500=0.3, fault_rate_503=0.3, seed=7))
    assert {200, 500, 503} == set(first)


def test_markers(emu: Emulator) -> None:
    c = client(emu)
    with pytest.raises(openai.BadRequestError) as bad:
        c.embeddings.create(model=EMB, input=["fine", "broken [[emulator:400]] row"])
    assert "[[emulator:400]]" in error_of(bad.value)["message"]
    with pytest.raises(openai.InternalServerError) as internal:
        c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "[[emulator:500]]"}])
    assert internal.value.status_code == 500
    with pytest.raises(openai.InternalServerError) as overloaded:
        c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x [[emulator:503]]"}])
    assert overloaded.value.status_code == 503
    assert error_of(overloaded.value)["message"] == "The model is overloaded. Please try again later."
    with pytest.raises(json.JSONDecodeError):
        c.embeddings.create(model=EMB, input="[[emulator:garbage]]")
    with pytest.raises(openai.APIConnectionError):
        c.embeddings.create(model=EMB, input="[[emulator:drop]]")
    assert c.embeddings.create(model=EMB, input="clean row").data
    faults = emu.stats["faults"]
    assert faults == {"marker:400": 1, "marker:500": 1, "marker:503": 1, "marker:garbage": 1, "marker:drop": 1}


def test_badjson_marker_gives_200_with_invalid_json_content(emu: Emulator) -> None:
    reply = client(emu).chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "[[emulator:badjson]]"}]
    )
    assert reply.choices[0].message.content == '{"oops": ' and emu.stats["faults"] == {"marker:badjson": 1}


# ---------------------------------------------------------------------------------------------
# stats and config


def test_stats_and_reset(emu: Emulator) -> None:
    c = client(emu)
    c.embeddings.create(model=EMB, input=["a", "b", "c"])
    c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hello"}])
    c.models.list()
    with pytest.raises(openai.BadRequestError):
        client(emu, api_key="nope").embeddings.create(model=EMB, input="x")
    stats = emu.stats
    assert stats["requests"] == 4
    assert stats["by_route"]["embeddings"] == 2
    assert stats["by_route"]["chat/completions"] == 1
    assert stats["by_route"]["models"] == 1
    assert stats["by_status"] == {200: 3, 400: 1}
    assert stats["embedding_inputs"] == 3
    assert stats["prompt_tokens"] == 3 + count_tokens("hello")
    assert stats["completion_tokens"] == count_tokens(fake_chat_text(CHAT, "hello"))
    stats["requests"] = 999
    assert emu.stats["requests"] == 4  # a snapshot, not the live dict
    emu.reset_stats()
    assert emu.stats["requests"] == 0 and emu.stats["by_status"] == {}


def test_config_repr_hides_key_and_configure(make_emu: Any) -> None:
    cfg = EmulatorConfig(api_key="super-secret-value")
    assert "super-secret-value" not in repr(cfg)
    with Emulator(cfg) as emu:
        c = openai.OpenAI(base_url=emu.base_url, api_key="super-secret-value", max_retries=0)
        assert c.embeddings.create(model=EMB, input="x").data
        emu.configure(api_key="rotated")
        with pytest.raises(openai.BadRequestError):
            c.embeddings.create(model=EMB, input="x")
    with pytest.raises(TypeError):
        EmulatorConfig("positional")  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# switches for other OpenAI-compatible servers


def test_without_the_retrieve_route_only_the_list_answers(make_emu: Any) -> None:
    emu = make_emu(retrieve_route=False, model_id_prefix="")
    status, _, body = raw_request(emu, "GET", f"/v1/models/{CHAT}")
    assert (status, json.loads(body)) == (404, {"detail": "Not Found"})
    assert f"{CHAT}" in [m.id for m in client(emu).models.list()]
    emu.configure(list_route=False)
    status, _, body = raw_request(emu, "GET", "/v1beta/openai/models")
    assert (status, json.loads(body)) == (404, {"detail": "Not Found"})
    assert emu.stats["by_route"]["models"] == 1 and emu.stats["by_status"] == {404: 2, 200: 1}


def test_the_first_model_requests_can_be_503(make_emu: Any) -> None:
    emu = make_emu(models_503_first=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as exc:
            client(emu).models.retrieve(CHAT)
        assert exc.value.status_code == 503
    assert client(emu).models.retrieve(CHAT).id == CHAT
    emu.configure(models_503_first=1)
    with pytest.raises(openai.InternalServerError):
        client(emu).models.list()
    assert client(emu).models.list().data
    assert emu.stats["faults"] == {"503": 3}


def test_openai_style_429_with_retry_after_on_posts_and_optionally_on_models(make_emu: Any) -> None:
    emu = make_emu(retry_after_429_rate=1.0, retry_after_seconds=0.25)
    request = json.dumps({"model": EMB, "input": "x"}).encode()
    status, headers, body = raw_request(emu, "POST", "/v1/embeddings", request)
    assert status == 429 and headers["retry-after"] == "0.25"
    error = json.loads(body)["error"]  # an object, not Gemini's array
    assert error["code"] == "rate_limit_exceeded" and "try again in 0.25s" in error["message"]
    assert client(emu).models.retrieve(CHAT).id == CHAT  # GETs only with faults_on_models
    emu.configure(faults_on_models=True)
    with pytest.raises(openai.RateLimitError):
        client(emu).models.retrieve(CHAT)
    assert emu.stats["faults"] == {"429": 2}
    with pytest.raises(ValueError, match="retry_after_429_rate"):
        EmulatorConfig(retry_after_429_rate=1.5)


def test_a_zero_429_rate_leaves_seeded_faults_unchanged(make_emu: Any) -> None:
    def pattern(emu: Emulator) -> list[int]:
        body = json.dumps({"model": EMB, "input": "x"}).encode()
        return [raw_request(emu, "POST", "/v1/embeddings", body)[0] for _ in range(30)]

    plain = pattern(make_emu(fault_rate_500=0.3, seed=3))
    assert plain == pattern(make_emu(fault_rate_500=0.3, seed=3, retry_after_429_rate=0.0))
    with_429 = pattern(make_emu(fault_rate_500=0.3, seed=3, retry_after_429_rate=0.3))
    # The 429s take numbers that answered 200 before; every 500 stays where it was.
    assert [s for s in with_429 if s == 500] == [s for s in plain if s == 500]
    assert [i for i, s in enumerate(with_429) if s == 500] == [i for i, s in enumerate(plain) if s == 500]
    assert 429 in with_429


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "svg"])
def test_images_in_the_configured_format(make_emu: Any, fmt: str) -> None:
    from emulator.fakes import fake_image

    emu = make_emu(image_format=fmt)
    resp = client(emu).images.generate(model="gemini-nano-banana-2.1", prompt="a fox", size="32x16")
    data = base64.b64decode(resp.data[0].b64_json or "")
    assert data == fake_image("a fox", 32, 16, fmt)
    if fmt == "svg":
        assert data.startswith(b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="16">')
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.size) == ({"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt], (32, 16))
    url = client(emu).images.generate(model="gemini-nano-banana-2.1", prompt="a fox", response_format="url")
    mime = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "svg": "image/svg+xml"}[fmt]
    assert (url.data[0].url or "").startswith(f"data:{mime};base64,")
    with pytest.raises(ValueError, match="image_format must be one of png, jpeg, webp, svg"):
        EmulatorConfig(image_format="gif")
