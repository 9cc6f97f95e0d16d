"""A LanceDB table as a run's output: ``--output lancedb://PATH/TABLE``.

The run itself is unchanged: it writes its parts, ``_runs/``, ``_claims/`` and ``_index/`` into a
*staging folder* beside the table (``PATH/TABLE.gembatch/``), so resume, skipping done rows by content,
two runs paying each row once, dry runs, budgets and batch mode hold as for a Parquet output. At the end
of a run the last run at work on the folder (the one that compacts it) brings the table in step:

1. the parts not yet applied (``_lance/applied.json`` names those that are) are merged into the table on
   the id: a new id is inserted, an id whose ``content_hash`` changed is updated in place, the same
   content is left alone. A crash between "parts written" and "table updated" heals at the end of the
   next run, which finds those parts still pending; applying a part twice changes nothing.
2. with ``--delete-missing``, ids the table holds and the input no longer has are deleted from the table
   and from the staging parts (so an id that comes back is sent again, not taken for done);
3. with ``--index``, a vector index is built or rebuilt when the table is big enough to need one and
   enough of it is not indexed (:func:`refresh_index`).

With ``--keep-text`` the table also holds the input's text column, read from the input for the rows
being applied, a group of parts at a time (tasks/sinks/lance_text.py). A table made with the other
choice is made again from the staging folder (no request), so its rows never mix texts and nulls.

The counts (inserted, updated, deleted, unchanged) go into the run metadata under ``output.table``; when
and how the sync runs, and what a failed one leaves, is tasks/sinks/lance_sync.py.
``lancedb`` is imported only here, and only for such an output (``pip install 'gembatch[lancedb]'``).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.errors import ConfigError
from tasks.sinks.lance_text import TextColumn
from tasks.sinks.location import SCHEME, TableLocation, is_table_output, staging_folder

if TYPE_CHECKING:
    from tasks.engine.plan.input import InputSource
    from tasks.engine.store.output import OutputStore

__all__ = [
    "SCHEME",
    "TableLocation",
    "TableSink",
    "is_table_output",
    "refresh_index",
    "staging_folder",
]


SYNC_DIR = "_lance"  # in the staging folder: which parts the table holds
APPLIED_FILE = "applied.json"
RUN_ID_COL = "run_id"
# Rows merged per commit, by bytes: memory stays bounded by this, not by the corpus.
MERGE_BYTES = 32 << 20
DELETE_BATCH = 1000  # ids per delete statement
# LanceDB's own advice: up to ~100k rows, its exact (brute-force) search is fast and an index is overhead.
INDEX_MIN_ROWS = 100_000
# Rebuild the index once this share of the table is not in it (new or updated rows since the last build).
REINDEX_SHARE = 0.10
INDEX_TYPE = "IVF_SQ"
INSTALL_HINT = "pip install 'gembatch[lancedb]' (or: uv add lancedb)"


def _lancedb() -> Any:
    try:
        import lancedb
    except ImportError:
        raise ConfigError(
            f"--output lancedb://… needs the lancedb package, which is not installed: {INSTALL_HINT}"
        ) from None
    return lancedb


@dataclass(frozen=True, kw_only=True)
class TableSink:
    """What a run does to the table once its parts are written (see the module's docstring)."""

    location: TableLocation
    id_col: str = "id"
    delete_missing: bool = False
    index: bool = False
    text_col: str | None = None  # --keep-text: the input's column the table holds too

    @classmethod
    def for_run(cls, job: str, output: str, id_col: str, parameters: dict[str, Any]) -> TableSink | None:
        """The sink of a run, or None for a Parquet output; refuses what can't work before any request."""
        delete_missing, index = bool(parameters.get("delete_missing")), bool(parameters.get("vector_index"))
        keep_text = bool(parameters.get("keep_text"))
        if not is_table_output(output):
            flags = [
                f
                for f, on in (("--delete-missing", delete_missing), ("--index", index), ("--keep-text", keep_text))
                if on
            ]
            if flags:
                raise ConfigError(
                    f"{' and '.join(flags)}: only for a LanceDB table output, and --output {output} is a Parquet "
                    "folder. Drop it, or write the table with --output lancedb://PATH/TABLE"
                )
            return None
        if keep_text and not parameters.get("text_col"):
            raise ConfigError(
                f"--keep-text keeps the input's text column beside each row, and gembatch {job} reads no text "
                "column: drop --keep-text"
            )
        if job == "images":
            raise ConfigError(
                "gembatch images writes image files beside its table; its output can't be a LanceDB table. "
                "Use a folder (--output PATH)"
            )
        if delete_missing and parameters.get("limit") is not None:
            raise ConfigError(
                "--delete-missing deletes the ids that are not in the input, and --limit reads only part of it: "
                "drop one of the two"
            )
        if importlib.util.find_spec("lancedb") is None:  # found, not imported: that takes seconds
            raise ConfigError(f"--output lancedb://… needs the lancedb package, which is not installed: {INSTALL_HINT}")
        return cls(
            location=TableLocation.parse(output),
            id_col=id_col,
            delete_missing=delete_missing,
            index=index,
            text_col=parameters["text_col"] if keep_text else None,
        )

    # -- the sync -----------------------------------------------------------------------------------
    def sync(self, store: OutputStore, source: InputSource | None, *, run_id: str, compacted: bool) -> dict[str, Any]:
        """Bring the table in step with the staging folder (and the input, with --delete-missing)."""
        db = _lancedb().connect(self.location.database)
        table = _open(db, self.location.table)
        applied, kept = self._read_applied(store) if table is not None else (set(), self.text_col)
        remade = table is not None and kept != self.text_col  # --keep-text changed: made again, all parts
        if remade:
            applied = set()
        pending = [p for p in store.result_files() if _name(p) not in applied]
        metas = {p: _part_meta(store, p) for p in pending}
        if not compacted and any(m.get("run_id") != run_id for m in metas.values()):
            # Parts of a run killed before it compacted may hold two records of an id: the newest must win.
            store.compact(self.id_col)
            pending = [p for p in store.result_files() if _name(p) not in applied]
            metas = {p: _part_meta(store, p) for p in pending}
        pending.sort(key=lambda path: metas[path].get("written_at_ns", 0))
        inserted = updated = 0
        if pending and (table is None or remade):
            table, inserted = self._create(db, store, pending, source, overwrite=remade)
            self._write_applied(store, {_name(p) for p in pending})
            _index_ids(table, self.id_col)
        elif pending:
            inserted, updated = self._merge(table, store, pending, applied, source)
        deleted = 0
        if self.delete_missing and table is not None and source is not None:
            deleted = self._delete_missing(table, store, source)
        rows = table.count_rows() if table is not None else 0
        document: dict[str, Any] = {
            "database": self.location.database,
            "table": self.location.table,
            "staging": store.url,
            "parts_applied": len(pending),
            "inserted": inserted,
            "updated": updated,
            "deleted": deleted,
            "unchanged": max(0, rows - inserted - updated),
            "rows": rows,
            "version": table.version if table is not None else None,
            "text_column": self.text_col,
        }
        if remade:
            document["remade"] = "made again from the staging folder: " + (
                f"--keep-text adds the text column {self.text_col}" if self.text_col else "without --keep-text"
            )
        if self.index:
            document["index"] = refresh_index(table) if table is not None else {"status": "no table yet"}
        return document

    def _texts(self, store: OutputStore, source: InputSource | None, pending: list[str]) -> TextColumn | None:
        """With --keep-text, the input's texts of the rows in these parts (one group at a time: memory
        follows a group, not the corpus)."""
        if self.text_col is None or source is None or not pending:
            return None
        ids = pa.chunked_array(
            [pq.read_table(p, columns=[self.id_col], filesystem=store.fs).column(0) for p in pending]
        )
        return TextColumn.read(source, self.id_col, self.text_col, ids)

    def _merge(
        self, table: Any, store: OutputStore, pending: list[str], applied: set[str], source: InputSource | None
    ) -> tuple[int, int]:
        """Merge the pending parts into the table on the id, a group at a time; returns (inserted, updated)."""
        inserted = updated = 0
        _index_ids(table, self.id_col)
        for group in _groups(store, pending):
            result = (
                table.merge_insert(self.id_col)
                .when_matched_update_all(where="target.content_hash != source.content_hash")
                .when_not_matched_insert_all()
                .execute(_read_parts(store, group, table.schema, self._texts(store, source, group)))
            )
            inserted += result.num_inserted_rows
            updated += result.num_updated_rows
            applied |= {_name(p) for p in group}
            self._write_applied(store, applied)
        return inserted, updated

    def _create(
        self, db: Any, store: OutputStore, pending: list[str], source: InputSource | None, *, overwrite: bool
    ) -> tuple[Any, int]:
        schema = _table_schema(store, pending[0], self.text_col)

        def batches() -> Iterator[pa.RecordBatch]:
            for group in _groups(store, pending):
                texts = self._texts(store, source, group)
                for path in group:
                    yield from _part_batches(store, path, schema, texts)

        data = pa.RecordBatchReader.from_batches(schema, batches())
        table = db.create_table(self.location.table, data=data, mode="overwrite" if overwrite else "create")
        return table, table.count_rows()

    def _delete_missing(self, table: Any, store: OutputStore, source: InputSource) -> int:
        """Delete the ids the table holds and the input doesn't, from the table and the staging parts."""
        wanted = pa.chunked_array([c.column(self.id_col) for c in source.iter_chunks([self.id_col], 1 << 18)])
        held = table.search().select([self.id_col]).limit(None).to_arrow().column(self.id_col)
        if held.type != wanted.type:
            wanted = wanted.cast(held.type)
        gone = held.filter(pc.invert(pc.is_in(held, value_set=wanted.combine_chunks())))
        if not len(gone):
            return 0
        deleted = 0
        values = gone.to_pylist()
        for start in range(0, len(values), DELETE_BATCH):
            where = f"`{self.id_col}` IN ({', '.join(_literal(v) for v in values[start : start + DELETE_BATCH])})"
            result = table.delete(where)
            deleted += getattr(result, "num_deleted_rows", 0) or 0
        gone_set = gone.combine_chunks()
        dropped = 0
        for path in store.result_files():
            ids = pq.read_table(path, columns=[self.id_col], filesystem=store.fs).column(0)
            rows = pc.indices_nonzero(pc.is_in(ids, value_set=gone_set.cast(ids.type))).to_numpy()
            if len(rows):
                dropped += store._drop_rows(path, rows)
        if dropped:
            store.refresh_key_cache(self.id_col)
        return deleted

    # -- which parts the table holds ---------------------------------------------------------------
    def _applied_path(self, store: OutputStore) -> str:
        return f"{store.root}/{SYNC_DIR}/{APPLIED_FILE}"

    def _read_applied(self, store: OutputStore) -> tuple[set[str], str | None]:
        """The parts the table holds, and the text column it was made with (None: none)."""
        try:
            with store.fs.open(self._applied_path(store), "r") as f:
                recorded = json.load(f)
        except (FileNotFoundError, ValueError):
            return set(), self.text_col
        return set(recorded.get("parts", [])), recorded.get("text_column")

    def _write_applied(self, store: OutputStore, parts: set[str]) -> None:
        from tasks.engine.store.output import TMP_PREFIX

        folder = f"{store.root}/{SYNC_DIR}"
        store.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/{TMP_PREFIX}{APPLIED_FILE}"
        with store.fs.open(tmp, "w") as f:
            json.dump({"table": self.location.table, "text_column": self.text_col, "parts": sorted(parts)}, f)
        store.fs.mv(tmp, self._applied_path(store))


def refresh_index(table: Any) -> dict[str, Any]:
    """Build the vector index when the table needs one and it is missing or stale; say what was done.

    IVF_SQ with cosine distance (docs/how-to/vector-index.md has the measurements): on 100,000 vectors
    it builds in under a second and LanceDB's search at its default settings finds 97.7% of the exact
    top 10 (100% with ``refine_factor(10)``); IVF_PQ found 26% at its defaults and IVF_HNSW_SQ took
    over two minutes and 2.5 GB to build. Below :data:`INDEX_MIN_ROWS` rows there is none (LanceDB's
    exact search is fast there). Rows added or updated since the last build are searched exactly by
    LanceDB beside the index until they pass :data:`REINDEX_SHARE` of the table; then it is rebuilt.
    """
    from lancedb.index import IvfSq

    column = next((f.name for f in table.schema if pa.types.is_fixed_size_list(f.type)), None)
    rows = table.count_rows()
    if column is None:
        return {"status": "no vector column"}
    if rows < INDEX_MIN_ROWS:
        return {"status": f"not needed: {rows} rows (< {INDEX_MIN_ROWS}: exact search is fast)", "column": column}
    existing = next((i for i in table.list_indices() if column in i.columns), None)
    unindexed = rows
    if existing is not None:
        stats = table.index_stats(existing.name)
        unindexed = (stats.num_unindexed_rows or 0) if stats is not None else rows
        if unindexed < REINDEX_SHARE * rows:
            return {"status": "current", "column": column, "type": INDEX_TYPE, "unindexed_rows": unindexed}
    table.create_index(column, config=IvfSq(distance_type="cosine"), replace=True)
    return {
        "status": "built" if existing is None else "rebuilt",
        "column": column,
        "type": INDEX_TYPE,
        "distance": "cosine",
        "unindexed_rows_before": unindexed,
    }


def _index_ids(table: Any, id_col: str) -> None:
    """A BTREE index on the id, kept current: a merge then reads only the rows it matches. Without it
    LanceDB scans the whole table for each merge (a 1M-row table: +217 MiB for 10,000 rows, +39 with it)."""
    from lancedb.index import BTree

    existing = next((i for i in table.list_indices() if list(i.columns) == [id_col]), None)
    if existing is not None:
        stats = table.index_stats(existing.name)
        if stats is not None and (stats.num_unindexed_rows or 0) <= REINDEX_SHARE * table.count_rows():
            return
    table.create_index(id_col, config=BTree(), replace=True)


def _open(db: Any, name: str) -> Any:
    try:
        return db.open_table(name)
    except (FileNotFoundError, ValueError):
        return None


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _part_meta(store: OutputStore, path: str) -> dict[str, Any]:
    from tasks.engine.store.part_files import META_KEY

    raw = (pq.read_schema(path, filesystem=store.fs).metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def _table_schema(store: OutputStore, path: str, text_col: str | None) -> pa.Schema:
    """The table's columns: the part's (the id, the job's typed columns, content_hash, model), the run,
    and with --keep-text the input's text."""
    schema = pq.read_schema(path, filesystem=store.fs).remove_metadata()
    if RUN_ID_COL not in schema.names:
        schema = schema.append(pa.field(RUN_ID_COL, pa.string()))
    if text_col is not None and text_col not in schema.names:
        schema = schema.append(pa.field(text_col, pa.string()))
    return schema


def _part_batches(
    store: OutputStore, path: str, schema: pa.Schema, texts: TextColumn | None = None
) -> Iterator[pa.RecordBatch]:
    """A part's rows in the table's columns (missing ones null, cast where types differ), with its run id
    (and its texts, with --keep-text)."""
    run_id = _part_meta(store, path).get("run_id")
    parquet = pq.ParquetFile(path, filesystem=store.fs)
    for batch in parquet.iter_batches(batch_size=8192):
        columns = []
        for field in schema:
            if field.name in batch.schema.names:
                column = batch.column(field.name)
                columns.append(column if column.type == field.type else column.cast(field.type))
            elif field.name == RUN_ID_COL:
                columns.append(pa.array([run_id] * batch.num_rows, pa.string()))
            elif texts is not None and field.name == texts.name:
                columns.append(texts.take(batch.column(texts.id_col)))
            else:
                columns.append(pa.nulls(batch.num_rows, field.type))
        yield pa.RecordBatch.from_arrays(columns, schema=schema)


def _groups(store: OutputStore, parts: list[str]) -> Iterator[list[str]]:
    """Whole parts, about :data:`MERGE_BYTES` of them a group (by their uncompressed size)."""
    group: list[str] = []
    size = 0
    for path in parts:
        meta = pq.ParquetFile(path, filesystem=store.fs).metadata
        part_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if group and size + part_bytes > MERGE_BYTES:
            yield group
            group, size = [], 0
        group.append(path)
        size += part_bytes
    if group:
        yield group


def _read_parts(store: OutputStore, parts: list[str], schema: pa.Schema, texts: TextColumn | None) -> pa.Table:
    batches = [b for path in parts for b in _part_batches(store, path, schema, texts)]
    return pa.Table.from_batches(batches, schema=schema)


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)
