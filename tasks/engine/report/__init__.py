"""Reporting a run: its metadata document, the progress bar, latency figures."""
