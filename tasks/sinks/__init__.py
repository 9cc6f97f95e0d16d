"""Outputs beyond a Parquet folder: a run writes its parts as always, then a sink brings a table in step."""
