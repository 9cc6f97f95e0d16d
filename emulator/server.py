"""The emulator's server: an HTTP/1.1 app on its own thread that routes each request to its API area,
checks the key, applies limits, latency and faults.

Written on raw asyncio streams (no web framework) so that transport faults -- truncated bodies,
dropped connections, hangs -- can be injected exactly. The API areas: emulator/chat.py,
embeddings.py, images.py, audio.py, models.py, files.py and batches.py, admin.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from emulator import admin, audio, chat, embeddings, faults, images, models
from emulator.batches import BatchService
from emulator.config import PREFIXES, ROUTES, EmulatorConfig
from emulator.errors import ApiError, TransportFault, bad_key, internal, openai_rate_limited
from emulator.limits import Limiter, busiest_window
from emulator.state import ServerState
from emulator.wire import HttpError, Request, Response, head, read_request

log = logging.getLogger("gembatch.emulator")

Handler = Callable[[ServerState, Request, str, EmulatorConfig], Awaitable[Response]]
HANDLERS: dict[tuple[str, str], Handler] = {
    ("POST", "embeddings"): embeddings.handle,
    ("POST", "chat/completions"): chat.handle,
    ("POST", "images/generations"): images.handle,
    ("POST", "audio/transcriptions"): audio.handle,
    ("GET", "models"): models.handle,
}


class Emulator:
    """OpenAI-compatible emulator of Gemini's compat endpoint, served from its own thread."""

    def __init__(self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0):
        self._config = config or EmulatorConfig()
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.state = ServerState(self._config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.batches = BatchService(self.state, self._answer_line)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Emulator:
        if self._thread is not None:
            return self
        self._ready.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name="gembatch-emulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._on_connect, self.host, self._requested_port, limit=1 << 20)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            self.state.host, self.state.port = self.host, self.port
        except BaseException as e:  # reported to start()'s caller
            self._start_error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._conn_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self._thread = None
            self._loop = None
            self._server = None
            self.batches.close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("emulator not started")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/v1beta/openai/"

    # -- configuration and stats ---------------------------------------------------------------

    @property
    def config(self) -> EmulatorConfig:
        return self._config

    def configure(self, **changes: Any) -> EmulatorConfig:
        new = dataclasses.replace(self._config, **changes)
        if "seed" in changes:
            self.state.rng = random.Random(new.seed)
        if "models_503_first" in changes:
            self.state.models_503_left = new.models_503_first
        if "route_answers" in changes:
            self.state.route_hits.clear()
        self._config = new
        return new

    @property
    def stats(self) -> dict[str, Any]:
        return self.state.snapshot()

    def reset_stats(self) -> None:
        self.state.reset_stats()

    def reset_limits(self) -> None:
        """Forget the rate-limit windows and the daily counts (thread-safe: runs on the loop)."""
        if self._loop is None:
            self.state.limiter = Limiter()
            return

        def reset() -> None:
            self.state.limiter = Limiter()

        self._loop.call_soon_threadsafe(reset)

    def busiest_window(self, seconds: float | None = None) -> int:
        """The most requests admitted within any window of ``seconds`` (default: the rate window)."""
        return busiest_window(self.state.limiter.admitted, seconds or self._config.window_seconds)

    async def _answer_line(self, req: Request, route: str) -> Response:
        """A batch line through the live route's handler (no rate limits: batches have their own quota)."""
        unlimited = dataclasses.replace(self._config, rpm=None, tpm=None, rpd=None, latency_seconds=0.0)
        return await HANDLERS[("POST", route)](self.state, req, "", unlimited)

    # -- connections -------------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        self.state.bump("connections")
        try:
            while True:
                try:
                    req = await read_request(reader, writer)
                except HttpError as e:
                    self.state.bump("requests")
                    resp = ApiError(e.status, "INVALID_ARGUMENT", str(e)).response()
                    await self._write(writer, resp, keep_alive=False)
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if req is None:
                    break
                if not await self._serve(req, writer):
                    break
        except asyncio.CancelledError:
            pass
        except ConnectionError:
            pass
        except Exception:
            log.exception("emulator connection handler failed")
        finally:
            self._conn_tasks.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def _write(self, writer: asyncio.StreamWriter, resp: Response, *, keep_alive: bool) -> None:
        if isinstance(resp.body, Path):
            self.state.bump("by_status", sub=resp.status)
            size = resp.body.stat().st_size
            writer.write(head(resp.status, resp.content_type, size, keep_alive, resp.headers))
            with resp.body.open("rb") as f:
                while block := f.read(1 << 20):
                    writer.write(block)
                    await writer.drain()
            return
        body = b"".join(resp.body) if isinstance(resp.body, list) else resp.body
        # Counted before writing: a client may read stats as soon as it has the answer.
        self.state.bump("by_status", sub=resp.status)
        # Two writes rather than head + body: concatenating would copy a multi-megabyte body again.
        writer.write(head(resp.status, resp.content_type, len(body), keep_alive, resp.headers))
        writer.write(body)
        await writer.drain()

    def _route(self, method: str, path: str, cfg: EmulatorConfig) -> tuple[str | None, str]:
        path = unquote(path)
        for prefix in PREFIXES:
            if path.startswith(prefix):
                rest = path[len(prefix) :].strip("/")
                break
        else:
            return None, ""
        if rest == "models":
            if not cfg.list_route:
                return None, ""
            return ("models" if method == "GET" else None), ""
        if rest.startswith("models/"):
            if not cfg.retrieve_route:
                return None, ""
            return ("models" if method == "GET" else None), rest[len("models/") :]
        if rest in ROUTES and method == "POST":
            return rest, ""
        return None, ""

    async def _serve(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        cfg = self._config
        keep_alive = req.keep_alive()
        own = self._own_route(req, cfg)
        if own is not None:
            await self._write(writer, own, keep_alive=keep_alive)
            return keep_alive
        self.state.bump("requests")
        canned = faults.canned(self.state, req, cfg)
        if canned is not None:
            await self._write(writer, canned, keep_alive=keep_alive)
            return keep_alive
        if BatchService.handles(req.path):
            await self._write(writer, await self._files_and_batches(req, cfg), keep_alive=keep_alive)
            return keep_alive
        self.state.enter()
        try:
            resp = await self._answer(req, cfg, writer, keep_alive)
        finally:
            self.state.leave()
        if isinstance(resp, bool):  # a transport fault answered (or broke) the connection itself
            return resp
        if resp.stream is not None:
            self.state.bump("by_status", sub=resp.status)
            return await resp.stream(writer, keep_alive)
        await self._write(writer, resp, keep_alive=keep_alive)
        return keep_alive

    def _own_route(self, req: Request, cfg: EmulatorConfig) -> Response | None:
        """The emulator's own routes (stats, configuration, served images), or None."""
        if req.method == "GET" and req.path.split("?")[0] == admin.STATS_PATH:
            return admin.stats(self.state, cfg, req.target)
        if req.method == "POST" and req.path == admin.CONFIG_PATH:
            return admin.reconfigure(req, cfg, self.configure)
        if req.method == "GET" and req.path.startswith(images.SERVED_IMAGES_PATH):
            return images.served_image(self.state, req.path)
        return None

    async def _files_and_batches(self, req: Request, cfg: EmulatorConfig) -> Response:
        self.state.bump("by_route", sub="batches")
        if not (req.has_key(cfg.api_key) or req.headers.get("x-goog-api-key") == cfg.api_key):
            return bad_key().response()
        if cfg.batch_request_seconds > 0:
            await asyncio.sleep(cfg.batch_request_seconds)
        return await self.batches.serve(req, cfg)

    async def _answer(
        self, req: Request, cfg: EmulatorConfig, writer: asyncio.StreamWriter, keep_alive: bool
    ) -> Response | bool:
        """The answer to an API request, or whether the connection stays open after a transport fault."""
        route, arg = self._route(req.method, req.path, cfg)
        fault = self._fault_for(req, route, cfg)
        if route is None and self._is_switched_off(req.path, cfg):
            return Response(404, b'{"detail":"Not Found"}')
        if route is None:
            return ApiError(404, "NOT_FOUND", f"Unknown route: {req.method} {req.path}").response()
        if not req.has_key(cfg.api_key):
            return bad_key().response()
        if fault == "429":
            self.state.bump("faults", sub=fault)
            return openai_rate_limited(cfg.retry_after_seconds)  # answered at once, like a limit
        if fault is not None:
            self.state.bump("faults", sub=fault)
            await self._delay(cfg)
            return await faults.transport_fault(fault, writer, keep_alive, cfg, self._writer_for(keep_alive))
        try:
            resp = await HANDLERS[(req.method, route)](self.state, req, arg, cfg)
        except ApiError as e:
            resp = e.response()
        except TransportFault as tf:
            self.state.bump("faults", sub=f"marker:{tf.kind}")
            await self._delay(cfg)
            kind = "garbage-json" if tf.kind == "garbage" else tf.kind
            return await faults.transport_fault(kind, writer, keep_alive, cfg, self._writer_for(keep_alive))
        except Exception:
            log.exception("emulator handler failed for %s %s", req.method, req.path)
            resp = internal().response()
        # Limits are counted when a request arrives (as a real server does); a 429 answers at
        # once, and so does a model lookup: only work for a model takes the model's time.
        if resp.status != 429 and req.method == "POST":
            await self._delay(cfg)
        return resp

    def _fault_for(self, req: Request, route: str | None, cfg: EmulatorConfig) -> str | None:
        """Count the request on its route and draw its fault (the models routes' first 503s included)."""
        if route is None:
            return None
        self.state.bump("by_route", sub=route)
        if route == "models" and self.state.models_503_left > 0:
            self.state.models_503_left -= 1
            return "503"
        if req.method == "POST" or (route == "models" and cfg.faults_on_models):
            return faults.pick_fault(self.state, cfg)
        return None

    def _writer_for(self, keep_alive: bool) -> faults.Write:
        async def write(writer: asyncio.StreamWriter, resp: Response) -> None:
            await self._write(writer, resp, keep_alive=keep_alive)

        return write

    @staticmethod
    def _is_switched_off(path: str, cfg: EmulatorConfig) -> bool:
        """A models route this configuration doesn't serve: answered like a FastAPI app's 404."""
        path = unquote(path)
        for prefix in PREFIXES:
            if path.startswith(prefix):
                rest = path[len(prefix) :].strip("/")
                if rest == "models":
                    return not cfg.list_route
                if rest.startswith("models/"):
                    return not cfg.retrieve_route
        return False

    async def _delay(self, cfg: EmulatorConfig) -> None:
        if cfg.latency_seconds <= 0:
            return
        seconds = cfg.latency_seconds
        if cfg.latency_jitter > 0:
            sigma = cfg.latency_jitter
            seconds *= math.exp(self.state.rng.gauss(0.0, sigma) - sigma * sigma / 2)
        await asyncio.sleep(seconds)


def serve(port: int, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1") -> None:
    """Run an emulator in the foreground until interrupted."""
    emu = Emulator(config, host=host, port=port).start()
    print(f"gembatch emulator listening on {emu.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
