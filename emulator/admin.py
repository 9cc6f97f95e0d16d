"""The emulator's own routes: GET /_emulator/stats (no key) and POST /_emulator/config (needs the key)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from emulator.bodies import parse_json
from emulator.config import EmulatorConfig
from emulator.errors import ApiError, bad_key, invalid, json_response
from emulator.limits import busiest_window
from emulator.state import ServerState
from emulator.wire import Request, Response

STATS_PATH = "/_emulator/stats"
# POST a JSON object of EmulatorConfig fields (fault rates, latency…) to change an emulator running in
# another process, e.g. to start and end an outage during a benchmark. Needs the key.
CONFIG_PATH = "/_emulator/config"


def stats(state: ServerState, cfg: EmulatorConfig, target: str) -> Response:
    """For benchmarks that drive an emulator in another process (no key: it holds no data)."""
    window = busiest_window(state.limiter.admitted, cfg.window_seconds)
    body = {**state.snapshot(), "busiest_window": window, "window_seconds": cfg.window_seconds}
    if "arrivals=1" in target:
        # When each admitted request arrived, on the wall clock: benchmarks line them up with runs.
        offset = time.time() - time.monotonic()
        body["admitted_unix"] = [round(t + offset, 3) for t in state.limiter.admitted]
    return json_response(body)


def reconfigure(req: Request, cfg: EmulatorConfig, configure: Callable[..., EmulatorConfig]) -> Response:
    """Apply the posted changes, answer the new configuration (without the key)."""
    if not req.has_key(cfg.api_key):
        return bad_key().response()
    try:
        changes = parse_json(req)
        if "api_key" in changes:
            raise invalid("the key can't be changed through the admin route")
        new = configure(**changes)
    except ApiError as e:
        return e.response()
    except (TypeError, ValueError) as e:
        return invalid(f"bad configuration: {e}").response()
    return json_response({k: v for k, v in dataclasses.asdict(new).items() if k != "api_key"})
