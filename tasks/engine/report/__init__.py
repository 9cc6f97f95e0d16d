"""Reporting a run: its metadata document and the progress bar."""
