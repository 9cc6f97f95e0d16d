"""The jobs: how a row becomes a request and a reply becomes typed columns (one module per job)."""
