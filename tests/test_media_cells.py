"""Media cells are input, not code paths: a bad or hostile cell costs one error row and leaks nothing.

Real files in tmp folders, the `gembatch` command (in this process) against the emulator on loopback, a real HTTP
server on 127.0.0.1 for http(s) cells, and a real "gateway" (a loopback proxy that wants credentials
in its URL) for the redaction of URL secrets.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx2
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, CliResult, cli_env, read_errors, read_output, run_gembatch

from emulator.fakes import fake_caption, fake_transcript
from tasks.defaults import DEFAULT_CAPTION_PROMPT
from tasks.jobs.images_io import image_for_model
from tasks.jobs.media_access import MediaPolicy, MediaRefused, media_root_of, missing_package
from tasks.redact import redact_text, redact_url

MODEL = "gemini-3.8-flash"
IMAGES = REPO / "data" / "images"
AUDIO = REPO / "data" / "audio"
SECRET_LINE = "root:x:0:0:TOPSECRET-line-of-a-private-file"
GATEWAY_USER, GATEWAY_PASSWORD, GATEWAY_QUERY_KEY = "user", "secret-gateway-password-5d1e", "qkey-3b9f0c77"


# -- helpers ----------------------------------------------------------------------------------------
def write_list(path: Path, column: str, values: list[str]) -> Path:
    table = pa.table({"id": pa.array(range(1, len(values) + 1), pa.int64()), column: values})
    pcsv.write_csv(table, path)
    return path


def gembatch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args, "--no-progress"],
        capture_output=True, text=True, env=env or cli_env(), cwd=REPO, timeout=300,
    )  # fmt: skip


def gembatch_here(capsys: pytest.CaptureFixture[str], *args: str) -> CliResult:
    """`gembatch ARGS --no-progress` in this process (conftest.run_gembatch), untracked."""
    return run_gembatch([*args, "--no-progress"], capsys)


def on_emulator(emu) -> list[str]:
    return ["--provider", "local", "--base-url", emu.base_url, "--api-key-env", TEST_KEY_ENV]


def everything_written(folder: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.fixture
def hostile(tmp_path) -> dict[str, Path]:
    """An input folder with one good file of each kind, a private file outside it, and cells that
    point out of the folder every way they can."""
    inside, outside = tmp_path / "in", tmp_path / "private"
    (inside / "media").mkdir(parents=True)
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_text(SECRET_LINE + "\n")
    shutil.copy(IMAGES / "sunset.png", inside / "media" / "sunset.png")
    shutil.copy(AUDIO / "speech.wav", inside / "media" / "speech.wav")
    (inside / "media" / "link.png").symlink_to(secret)
    (inside / "media" / "link.wav").symlink_to(secret)
    # Inside the folder but not media: its bytes must not reach a message either.
    (inside / "media" / "notes.png").write_text(SECRET_LINE + "\n")
    (inside / "media" / "notes.wav").write_text(SECRET_LINE + "\n")
    return {"in": inside, "secret": secret}


def hostile_cells(kind: str, secret: Path) -> list[str]:
    ext = "png" if kind == "image" else "wav"
    return [
        f"media/{'sunset.png' if kind == 'image' else 'speech.wav'}",  # 1: fine
        f"http://example.com/x.{ext}",  # 2: http is off by default
        f"s3://some-bucket/x.{ext}",  # 3: s3 is not this input's scheme (and s3fs is not installed)
        "/etc/passwd",  # 4
        "../../../../../../../../etc/passwd",  # 5
        str(secret),  # 6: an absolute path outside the folder
        f"../private/{secret.name}",  # 7
        f"media/link.{ext}",  # 8: a symbolic link inside the folder, pointing outside
        f"media/notes.{ext}",  # 9: inside, but not media
    ]


EXPECTED = {
    2: ["http URLs in a media column are not fetched unless allowed", "--allow-media-scheme http"],
    3: ["s3:// URLs are not read", "--allow-media-scheme s3"],
    4: ["/etc/passwd is outside the folder", "--media-root"],
    5: ["/etc/passwd (from '../../", "outside the folder", "--media-root"],
    6: ["secret.png is outside the folder", "--media-root"],
    7: ["secret.png (from '../private/secret.png') is outside the folder"],
    8: ["through a symbolic link", "--media-root"],
}


def check_hostile_run(result: CliResult, out: Path, expected_good: str, not_media: str) -> None:
    assert result.returncode == 4, result.stderr  # completed with errors: the run went on
    assert "Traceback" not in result.stdout + result.stderr
    good = read_output(out)
    assert good["id"].to_list() == [1]
    assert good.row(0, named=True)[expected_good[0]] == expected_good[1]
    errors = {r["id"]: r for r in read_errors(out).to_dicts()}
    assert sorted(errors) == list(range(2, 10))
    assert all(r["error_type"] == "invalid_input" for r in errors.values())
    for row_id, fragments in EXPECTED.items():
        for fragment in fragments:
            assert fragment in errors[row_id]["error_message"], (row_id, errors[row_id]["error_message"])
    assert not_media in errors[9]["error_message"]
    if missing_package("s3"):
        assert "pip install s3fs" in errors[3]["error_message"]
    # No byte of a file outside the folder, nor of the text file inside it, was written or printed.
    for where in (everything_written(out), result.stdout.encode(), result.stderr.encode()):
        assert b"root:x" not in where and b"TOPSECRET" not in where


# -- a hostile cell is one error row -----------------------------------------------------------------
def test_caption_hostile_cells_cost_one_error_row_each_and_leak_no_bytes(emulator, hostile, tmp_path, capsys):
    src = write_list(hostile["in"] / "list.csv", "image", hostile_cells("image", hostile["secret"]))
    out = tmp_path / "out"
    result = gembatch_here(capsys, "caption", str(src), "-o", str(out), *on_emulator(emulator))
    sunset = image_for_model((IMAGES / "sunset.png").read_bytes(), 1536, name="sunset.png")
    caption = fake_caption(sunset.data, sunset.mime, MODEL, DEFAULT_CAPTION_PROMPT)
    check_hostile_run(result, out, ("caption", caption), "notes.png (")
    assert "is not a PNG, JPEG, WebP" in read_errors(out).filter(id=9)["error_message"][0]


def test_transcribe_hostile_cells_cost_one_error_row_each_and_leak_no_bytes(emulator, hostile, tmp_path, capsys):
    src = write_list(hostile["in"] / "list.csv", "audio", hostile_cells("audio", hostile["secret"]))
    out = tmp_path / "out"
    result = gembatch_here(capsys, "transcribe", str(src), "-o", str(out), *on_emulator(emulator))
    data = (AUDIO / "speech.wav").read_bytes()
    check_hostile_run(result, out, ("transcript", fake_transcript(data, "wav", MODEL)), "notes.wav")


def test_a_scheme_allowed_but_not_installed_is_refused_before_anything_is_sent(emulator, tmp_path, capsys):
    if missing_package("s3") is None:
        pytest.skip("s3fs is installed here")
    src = write_list(tmp_path / "list.csv", "image", ["s3://some-bucket/x.png"])
    out = tmp_path / "out"
    result = gembatch_here(
        capsys, "caption", str(src), "-o", str(out), "--allow-media-scheme", "s3", *on_emulator(emulator)
    )
    assert result.returncode == 2, result.stderr
    assert "pip install s3fs" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    assert emulator.stats.get("requests", 0) == 0


def test_media_root_widens_where_paths_may_point(emulator, hostile, tmp_path, capsys):
    shutil.copy(IMAGES / "house.jpg", hostile["secret"].parent / "house.jpg")
    src = write_list(hostile["in"] / "list.csv", "image", ["../private/house.jpg", "media/sunset.png"])
    out = tmp_path / "out"
    extra = ["--media-root", str(hostile["secret"].parent)]
    result = gembatch_here(capsys, "caption", str(src), "-o", str(out), *extra, *on_emulator(emulator))
    assert result.returncode == 0, result.stderr
    assert read_output(out)["id"].sort().to_list() == [1, 2]


# -- http(s) cells -----------------------------------------------------------------------------------
@contextmanager
def file_server(files: dict[str, bytes | str]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``files``; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = files.get(self.path)
            if isinstance(body, str):  # a redirect
                self.send_response(302)
                self.send_header("Location", body)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_http_cells_are_fetched_when_allowed_and_reach_loopback_only_when_asked(emulator, tmp_path, kind, capsys):
    sample = (IMAGES / "sunset.png") if kind == "image" else (AUDIO / "speech.wav")
    command, column = ("caption", "image") if kind == "image" else ("transcribe", "audio")
    with file_server({f"/{sample.name}": sample.read_bytes()}) as site:
        src = write_list(tmp_path / "list.csv", column, [f"{site}/{sample.name}", f"{site}/missing.bin"])

        refused = gembatch_here(capsys, command, str(src), "-o", str(tmp_path / "a"), "--allow-media-scheme", "http",
                           *on_emulator(emulator))  # fmt: skip
        assert refused.returncode == 4, refused.stderr
        errors = read_errors(tmp_path / "a").sort("id")["error_message"].to_list()
        assert all("127.0.0.1, a loopback address" in m and "--allow-private-urls" in m for m in errors), errors

        allowed = gembatch_here(capsys, command, str(src), "-o", str(tmp_path / "b"), "--allow-media-scheme", "http",
                           "--allow-private-urls", *on_emulator(emulator))  # fmt: skip
    assert allowed.returncode == 4, allowed.stderr  # the missing file is an error row
    row = read_output(tmp_path / "b").row(0, named=True)
    if kind == "image":
        sent = image_for_model(sample.read_bytes(), 1536, name=sample.name)
        assert row["caption"] == fake_caption(sent.data, sent.mime, MODEL, DEFAULT_CAPTION_PROMPT)
    else:
        assert row["transcript"] == fake_transcript(sample.read_bytes(), "wav", MODEL)
    (missing,) = read_errors(tmp_path / "b")["error_message"].to_list()
    assert "missing.bin answered HTTP 404" in missing


def test_redirects_are_checked_like_cells_and_bodies_are_capped():
    png = (IMAGES / "sunset.png").read_bytes()
    with file_server({"/ok/a.png": png, "/ok/away": "/private/a.png", "/ok/here": "/ok/a.png"}) as site:
        policy = MediaPolicy.under((f"{site}/ok/",), allow_private=True)
        assert policy.open(policy.check(f"{site}/ok/here")).read() == png
        with pytest.raises(MediaRefused, match="not fetched unless allowed"):
            policy.open(f"{site}/ok/away")
        with pytest.raises(MediaRefused, match="not fetched unless allowed"):
            policy.check(f"{site}/private/a.png")
        small = MediaPolicy.under((f"{site}/ok/",), allow_private=True, max_url_bytes=100)
        with pytest.raises(MediaRefused, match="over the 100-byte limit"):
            small.open(f"{site}/ok/a.png")


def test_policy_checks_every_address_and_follows_the_input_root(tmp_path):
    policy = MediaPolicy.for_input(str(tmp_path / "list.csv"), schemes=("https",))
    with pytest.raises(MediaRefused, match="a loopback address"):
        policy.open("https://localhost:9/x.png")
    with pytest.raises(MediaRefused, match="link-local address"):
        policy.open("http://169.254.169.254/latest/meta-data/")
    with pytest.raises(MediaRefused, match="not fetched unless allowed"):
        policy.check("http://example.com/x.png")  # https only
    assert media_root_of("/data/rec/**/*.mp3") == "/data/rec"
    assert media_root_of("s3://bucket/prefix/list.csv") == "s3://bucket/prefix"
    remote = MediaPolicy.for_input("s3://bucket/prefix/list.csv")
    assert remote._url_allowed("s3://bucket/prefix/a/b.png", "s3")
    assert not remote._url_allowed("s3://bucket/prefix/../other/b.png", "s3")
    assert not remote._url_allowed("s3://bucket/prefixed/b.png", "s3")
    # fsspec names one file several ways: a glob's listing gives memory:///…, the input memory://…
    glob = MediaPolicy.for_input("memory://audio-in/2025/**/*.wav")
    assert glob.check("memory:///audio-in/2025/a/x.wav") == "memory:///audio-in/2025/a/x.wav"
    with pytest.raises(MediaRefused, match="memory:// URLs are not read"):
        glob.check("memory://audio-in/2025/../other.wav")
    with pytest.raises(MediaRefused, match="not a scheme gembatch can read"):
        glob.check("nosuchscheme://x/y.wav")


# -- secrets in URLs ---------------------------------------------------------------------------------
def test_redact_url_hides_userinfo_and_key_parameters():
    url = "http://user:pw@127.0.0.1:8080/v1beta/openai/?key=abc&api-version=2024"
    assert redact_url(url) == "http://***@127.0.0.1:8080/v1beta/openai/?key=***&api-version=2024"
    assert (
        redact_url("https://h/x.png?X-Amz-Signature=s1&token=t&a=1")
        == "https://h/x.png?X-Amz-Signature=***&token=***&a=1"
    )
    text = "cannot reach http://u:p@h:1/v1/?api_key=k. Check it (https://ok.example/p)"
    assert redact_text(text) == "cannot reach http://***@h:1/v1/?api_key=***. Check it (https://ok.example/p)"
    assert redact_url("https://generativelanguage.googleapis.com/v1beta/openai/") == (
        "https://generativelanguage.googleapis.com/v1beta/openai/"
    )


@contextmanager
def gateway(upstream: str) -> Iterator[int]:
    """A loopback proxy in front of the emulator that wants Basic credentials and a ``key`` parameter
    in its URL (as company gateways do), and passes requests on with the emulator's key."""
    expected = "Basic " + base64.b64encode(f"{GATEWAY_USER}:{GATEWAY_PASSWORD}".encode()).decode()
    client = httpx2.Client(timeout=30)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            parts = urlsplit(self.path)
            query = dict(parse_qsl(parts.query))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Authorization") != expected or query.pop("key", None) != GATEWAY_QUERY_KEY:
                status, headers, content = 401, {"content-type": "application/json"}, b'{"error": "gateway"}'
            else:
                headers = {"Authorization": f"Bearer {TEST_KEY}"}
                if "Content-Type" in self.headers:
                    headers["Content-Type"] = self.headers["Content-Type"]
                answer = client.request(
                    self.command, upstream + parts.path, params=query, content=body, headers=headers
                )
                status, headers, content = answer.status_code, answer.headers, answer.content
            self.send_response(status)
            self.send_header("Content-Type", headers.get("content-type", "application/json"))
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = _forward

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        client.close()


def test_url_credentials_appear_nowhere_in_clear(prefect_server, emulator, tmp_path, capfd):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from flows.caption import caption_flow
    from flows.params import CommonOptions
    from tasks.errors import RunNotCompleted

    upstream = f"http://127.0.0.1:{urlsplit(emulator.base_url).port}"
    shutil.copy(IMAGES / "sunset.png", tmp_path / "sunset.png")
    # One good row, one refused row (a presigned-looking URL: its signature is a secret too).
    src = write_list(
        tmp_path / "list.csv", "image", ["sunset.png", "https://cdn.example/x.png?X-Amz-Signature=sig-8a7b6c5d"]
    )
    secrets = [GATEWAY_PASSWORD, GATEWAY_QUERY_KEY, "sig-8a7b6c5d", TEST_KEY]
    with gateway(upstream) as port:
        base_url = f"http://{GATEWAY_USER}:{GATEWAY_PASSWORD}@127.0.0.1:{port}/v1beta/openai/?key={GATEWAY_QUERY_KEY}"
        common = {"base_url": base_url, "api_key_env": TEST_KEY_ENV, "provider": "local"}

        untracked = gembatch("caption", str(src), "-o", str(tmp_path / "cli"), "--base-url", base_url,
                             "--api-key-env", TEST_KEY_ENV)  # fmt: skip
        assert untracked.returncode == 4, untracked.stderr  # the refused row; the good one went through the gateway
        assert read_output(tmp_path / "cli")["id"].to_list() == [1]

        async def tracked() -> dict:
            try:
                # As the command calls it: the options model, which Prefect stores with the URL redacted.
                await caption_flow(input=str(src), output=str(tmp_path / "flow"), options=CommonOptions(**common))
            except RunNotCompleted as exc:
                return exc.document
            raise AssertionError("a run with a failed row ends 'completed with errors'")

        doc = asyncio.run(tracked())
        wrong_url = base_url.replace(GATEWAY_QUERY_KEY, "qkey-wrong-" + GATEWAY_QUERY_KEY)
        wrong = gembatch("caption", str(src), "-o", str(tmp_path / "wrong"), "--api-key-env", TEST_KEY_ENV,
                         "--base-url", wrong_url)  # fmt: skip
    assert doc["counts"]["succeeded"] == 1 and doc["counts"]["failed"] == 1
    assert doc["provider"]["host"] == f"127.0.0.1:{port}"
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr

    APILogWorker.drain_all(timeout=10)

    async def prefect_records() -> list[str]:
        async with get_client() as client:
            ids = [doc["flow_run_id"]]
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
            artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            run = await client.read_flow_run(doc["flow_run_id"])  # its parameters, as the server keeps them
            return [log.message for log in logs] + [str(a.data) for a in artifacts] + [json.dumps(run.parameters)]

    records = asyncio.run(prefect_records())
    assert records, "the flow run logged and published its summary"
    captured = capfd.readouterr()
    texts = {
        "cli stdout": untracked.stdout, "cli stderr": untracked.stderr, "wrong key stderr": wrong.stderr,
        "wrong key stdout": wrong.stdout, "test stdout": captured.out, "test stderr": captured.err,
        "prefect logs, artifacts, flow run parameters": "\n".join(records),
        "outputs": (everything_written(tmp_path / "cli") + everything_written(tmp_path / "flow")).decode("latin-1"),
    }  # fmt: skip
    leaks = [(where, s) for where, text in texts.items() for s in secrets if s in text]
    assert leaks == []
    assert "***" in (tmp_path / "cli" / "_runs").glob("*.json").__next__().read_text()


def test_a_file_swapped_for_a_link_after_planning_is_refused_when_opened(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "secret.png").write_text(SECRET_LINE)
    planned = tmp_path / "in" / "a.png"
    shutil.copy(IMAGES / "sunset.png", planned)
    policy = MediaPolicy.for_input(str(tmp_path / "in" / "list.csv"))
    location = policy.check(str(planned))
    planned.unlink()
    planned.symlink_to(tmp_path / "secret.png")
    with pytest.raises(MediaRefused, match="through a symbolic link") as refused:
        policy.open(location)
    assert "TOPSECRET" not in str(refused.value)
