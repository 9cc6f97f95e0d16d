"""The output store: atomic part files, superseding, error rows, and the key cache."""
