"""Where a LanceDB output is: ``lancedb://PATH/TABLE`` → the database, the table and the staging folder.

Standard library only: the command line reads it for every run (a ``lancedb://`` output or not).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tasks.errors import ConfigError

__all__ = ["SCHEME", "STAGING_SUFFIX", "TableLocation", "is_table_output", "staging_folder"]

SCHEME = "lancedb://"
STAGING_SUFFIX = ".gembatch"
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def is_table_output(output: str | None) -> bool:
    return bool(output) and output.startswith(SCHEME)


@dataclass(frozen=True)
class TableLocation:
    """Where the table is: ``database`` (a folder or an ``s3://``/``gs://`` prefix) and the table's name."""

    database: str
    table: str

    @classmethod
    def parse(cls, output: str) -> TableLocation:
        rest = output[len(SCHEME) :].rstrip("/")
        if "/" not in rest:
            raise ConfigError(
                f"--output {output}: name the database folder and the table, lancedb://PATH/TABLE "
                "(e.g. lancedb://data/out/vectors/docs, lancedb:///abs/path/docs or lancedb://s3://bucket/db/docs)"
            )
        database, table = rest.rsplit("/", 1)
        if not _TABLE_NAME.match(table) or table.endswith(STAGING_SUFFIX):
            raise ConfigError(
                f"--output {output}: {table!r} is not a table name LanceDB takes; use letters, digits, _ - and ."
            )
        return cls(database=database or "/", table=table)

    @property
    def staging(self) -> str:
        """The folder the run writes into, as it would for a Parquet output."""
        return f"{self.database.rstrip('/')}/{self.table}{STAGING_SUFFIX}"


def staging_folder(output: str) -> str:
    """The folder a run writes its parts into: the staging folder for a table, else the output itself."""
    return TableLocation.parse(output).staging if is_table_output(output) else output
