"""The engine, written once: planning, the limiter, the fan-out of a chunk, the output store, metadata."""
