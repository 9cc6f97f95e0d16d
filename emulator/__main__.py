"""python -m emulator: run an emulator in the foreground."""

from __future__ import annotations

import argparse

from emulator.config import EmulatorConfig
from emulator.server import serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m emulator", description="Run the gembatch emulator.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api-key", default="emulator-key")
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    parser.add_argument("--rpd", type=int)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    config = EmulatorConfig(
        api_key=args.api_key, rpm=args.rpm, tpm=args.tpm, rpd=args.rpd, latency_seconds=args.latency
    )
    serve(args.port, config, host=args.host)


if __name__ == "__main__":
    main()
