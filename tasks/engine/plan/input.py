"""Reading the input in chunks (Parquet or CSV, local path or fsspec URL) without loading it whole.

For the media jobs (transcribe, caption) the input may also be a folder or a glob of files
(``recordings/``, ``'recordings/**/*.mp3'``, ``memory://in/*.wav``): it reads as a table of two columns,
the id (the file's path relative to the folder, or to the glob's fixed leading folders) and the
media column (the file's full path or URL). A folder takes the files whose extension the job reads;
a glob takes every file that matches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from tasks.errors import InputError

__all__ = ["InputSource"]

GLOB_CHARS = "*?["
CSV_BLOCK_BYTES = 4 << 20
FINGERPRINT_BLOCK_BYTES = 8 << 20
PARQUET_READ_BUFFER = 1 << 20
# The id check's key table at most (8 bytes an id): past it, the key space is checked a slice a pass.
ID_CHECK_BYTES = 32 << 20


@dataclass(frozen=True)
class InputSource:
    """One input table. ``format`` is ``parquet`` or ``csv``, from the name or the file's first bytes."""

    path: str
    format: str
    size_bytes: int
    # A folder or glob input: the files (full paths or URLs) and their ids, in id order.
    files: tuple[str, ...] | None = None
    file_ids: tuple[str, ...] | None = None
    file_sizes: tuple[int, ...] | None = None

    @classmethod
    def open(cls, path: str, *, media_extensions: Sequence[str] | None = None) -> InputSource:
        """``media_extensions``: the job reads media files, so a folder or glob is a valid input (a
        folder takes the files with these extensions)."""
        if media_extensions is not None and any(c in path for c in GLOB_CHARS):
            return cls._open_files(path, media_extensions, glob=True)
        try:
            fs, fs_path = fsspec.core.url_to_fs(path)
            info = fs.info(fs_path)
        except FileNotFoundError:
            raise InputError(f"input {path} does not exist: check the path (or the URL's bucket and key)") from None
        except (OSError, ValueError, ImportError) as exc:
            raise InputError(f"input {path} can't be opened: {exc}") from None
        if info.get("type") == "directory":
            if media_extensions is not None:
                return cls._open_files(path, media_extensions, glob=False)
            raise InputError(f"input {path} is a folder: give one Parquet or CSV file")
        try:
            with fs.open(fs_path, "rb") as f:
                head = f.read(4)
        except OSError as exc:
            raise InputError(f"input {path} can't be read: {exc}. Check its permissions.") from None
        size = int(info.get("size") or 0)
        if media_extensions is not None and fs_path.rsplit(".", 1)[-1].lower() in media_extensions:
            # One recording or picture: a folder input of that one file (id = its name).
            name = fs_path.rsplit("/", 1)[-1]
            local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
            url = fs_path if local else fs.unstrip_protocol(fs_path)
            return cls(path=path, format="file", size_bytes=size, files=(url,), file_ids=(name,), file_sizes=(size,))
        if size == 0:
            raise InputError(f"input {path} is empty (0 bytes): give a Parquet or CSV file with a header and rows")
        return cls(path=path, format=_detect_format(path, head), size_bytes=size)

    @classmethod
    def _open_files(cls, path: str, extensions: Sequence[str], *, glob: bool) -> InputSource:
        try:
            fs, fs_path = fsspec.core.url_to_fs(path)
            if glob:
                fixed = fs_path[: min(fs_path.index(c) for c in GLOB_CHARS if c in fs_path)]
                root = fixed.rsplit("/", 1)[0] if "/" in fixed else ""
                found = fs.glob(fs_path, detail=True)
            else:
                root = fs_path.rstrip("/")
                found = fs.find(root, detail=True)
        except (OSError, ValueError, ImportError) as exc:
            raise InputError(f"input {path} can't be listed: {exc}") from None
        wanted = {e.lower().lstrip(".") for e in extensions}
        files: list[tuple[str, str, int]] = []
        for name, info in found.items():
            if info.get("type") == "directory":
                continue
            relative = name[len(root) :].lstrip("/") if root and name.startswith(root) else name.lstrip("/")
            base = relative.rsplit("/", 1)[-1]
            if not glob and (base.startswith(".") or base.rsplit(".", 1)[-1].lower() not in wanted or "." not in base):
                continue
            files.append((relative, name, int(info.get("size") or 0)))
        if not files:
            if glob:
                raise InputError(f"input {path} matches no files: check the pattern (quote it so the shell leaves it)")
            shown = ", ".join(f".{e}" for e in sorted(wanted))
            raise InputError(f"input folder {path} holds no files ending {shown}: give a glob to pick others")
        files.sort()
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        urls = tuple(name if local else fs.unstrip_protocol(name) for _, name, _ in files)
        return cls(
            path=path,
            format="glob" if glob else "folder",
            size_bytes=sum(size for *_, size in files),
            files=urls,
            file_ids=tuple(relative for relative, *_ in files),
            file_sizes=tuple(size for *_, size in files),
        )

    def columns(self) -> list[str]:
        return list(self.schema().names)

    def schema(self) -> pa.Schema:
        if self.files is not None:
            return pa.schema([pa.field("id", pa.string()), pa.field("path", pa.string())])
        with self._open() as f:
            if self.format == "parquet":
                try:
                    return pq.ParquetFile(f).schema_arrow
                except pa.ArrowException as exc:
                    raise InputError(
                        f"input {self.path} is not a valid Parquet file ({exc}): check that it was written "
                        "completely, or name a CSV file .csv"
                    ) from None
            head = f.read(4)
            f.seek(0)
            if head == b"PAR1":
                raise InputError(f"input {self.path} looks like Parquet, not CSV: rename it to .parquet")
            try:
                return pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES)).schema
            except pa.ArrowInvalid as exc:
                raise self._csv_error(exc, rows_before=0) from None

    def require_columns(self, needed: list[str]) -> None:
        if self.files is not None:
            return  # a folder's table is made for the job: its id column and the media column
        have = self.columns()
        missing = [c for c in needed if c not in have]
        if missing:
            raise InputError(
                f"input {self.path} has no column {', '.join(repr(c) for c in missing)}; "
                f"its columns are: {', '.join(have)}. Name the right one with the option that chose it "
                "(--id-col, --text-col, --image-col, --audio-col or --prompt-col)."
            )

    def iter_chunks(
        self, columns: list[str], chunk_size: int, *, string_columns: tuple[str, ...] = ()
    ) -> Iterator[pa.Table]:
        """Tables of ``chunk_size`` rows (the last may be shorter), only the named columns.

        A folder or glob input: the first column holds the ids, the others the files' paths or URLs."""
        if self.files is not None:
            yield from self._file_chunks(columns, chunk_size)
            return
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for batch in self._iter_batches(columns, chunk_size, string_columns):
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= chunk_size:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, chunk_size)
                rest = table.slice(chunk_size)
                pending = rest.to_batches()
                pending_rows = rest.num_rows
        if pending_rows:
            yield pa.Table.from_batches(pending)

    def _file_chunks(self, columns: list[str], chunk_size: int) -> Iterator[pa.Table]:
        assert self.files is not None and self.file_ids is not None
        for start in range(0, len(self.files), chunk_size):
            ids = pa.array(self.file_ids[start : start + chunk_size], pa.string())
            paths = pa.array(self.files[start : start + chunk_size], pa.string())
            yield pa.table({name: ids if i == 0 else paths for i, name in enumerate(columns)})

    def fingerprint(self) -> str:
        """sha256 of the file's bytes: two runs over the same fingerprint read the same input. A
        folder or glob: of its listing (ids and sizes), not of every file's bytes."""
        digest = hashlib.sha256()
        if self.files is not None:
            for file_id, size in zip(self.file_ids or (), self.file_sizes or ()):
                digest.update(f"{file_id}\0{size}\n".encode())
            return "sha256:" + digest.hexdigest()
        with self._open(raw=True) as f:
            while block := f.read(FINGERPRINT_BLOCK_BYTES):
                digest.update(block)
        return "sha256:" + digest.hexdigest()

    def _open(self, *, raw: bool = False):
        return fsspec.open(self.path, "rb", compression=None if raw else "infer").open()

    def _iter_batches(
        self, columns: list[str], batch_size: int, string_columns: tuple[str, ...]
    ) -> Iterator[pa.RecordBatch]:
        with self._open() as f:
            if self.format == "parquet":
                # One reader per row group: pyarrow's iter_batches over a whole file holds on to what
                # it decoded until the iteration ends (a 10M-row input grew the process by ~430 MiB);
                # per row group, memory stays at about one decoded row group.
                # Unbuffered, pyarrow decompresses a column's whole chunk at once; through a small read
                # buffer it goes page by page (a 500,000-row row group of texts: ~100 MB vs ~30).
                parquet = pq.ParquetFile(f, pre_buffer=False, buffer_size=PARQUET_READ_BUFFER)
                for group in range(parquet.num_row_groups):
                    yield from parquet.iter_batches(batch_size=batch_size, columns=columns, row_groups=[group])
                return
            # Text columns are read as bytes: a cell that is not UTF-8 then fails its own row (the
            # engine decodes it), instead of the whole block.
            convert = pcsv.ConvertOptions(
                include_columns=columns,
                column_types={c: pa.binary() for c in string_columns},
                strings_can_be_null=True,
            )
            rows_before = 0
            try:
                reader = pcsv.open_csv(
                    f, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES), convert_options=convert
                )
                while True:
                    try:
                        batch = reader.read_next_batch()
                    except StopIteration:
                        return
                    rows_before += batch.num_rows
                    yield batch
            except pa.ArrowInvalid as exc:
                raise self._csv_error(exc, rows_before=rows_before) from None

    def _csv_error(self, exc: pa.ArrowInvalid, *, rows_before: int) -> InputError:
        """Name the line pyarrow choked on: it quotes the line's text but not its number."""
        message = str(exc)
        where = f"after data row {rows_before}"
        marker = "got "
        if "CSV parse error" in message and ": " in message.split(marker, 1)[-1]:
            bad_text = message.split(marker, 1)[-1].split(": ", 1)[1]
            line = self._find_line(bad_text)
            if line is not None:
                where = f"at line {line} (data row {line - 1})"
        hint = (
            "save the file as UTF-8"
            if "UTF8" in message
            else "fix the line (quote fields that hold commas, quotes or newlines)"
        )
        return InputError(
            f"input {self.path}: the CSV can't be parsed {where}: {message}. Then {hint} and rerun; rows "
            "already written are kept and skipped."
        )

    def _find_line(self, text: str) -> int | None:
        wanted = text.encode(errors="replace").rstrip(b"\r\n")
        with self._open() as f:
            for number, line in enumerate(f, start=1):
                if line.rstrip(b"\r\n") == wanted:
                    return number
        return None


def _detect_format(path: str, head: bytes) -> str:
    lowered = path.lower()
    for suffix, fmt in ((".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv"), (".csv.gz", "csv")):
        if lowered.endswith(suffix):
            return fmt
    if head == b"PAR1":
        return "parquet"
    raise InputError(
        f"input {path} is neither Parquet nor CSV (by its name or its first bytes): give a .parquet or .csv file"
    )


def check_ids(
    source: InputSource, id_col: str, *, limit: int | None, chunk_size: int = 1 << 18, max_bytes: int = ID_CHECK_BYTES
) -> int:
    """Read the id column: every row needs a unique, non-null id. Returns the row count.

    Streams. The first pass counts rows and nulls and sees whether the ids are integers that only grow
    (row numbers, sequences: unique without remembering any). Otherwise each id becomes a 64-bit key
    (exact for integer ids, a hash otherwise) in a key table, 8 bytes an id; past ``max_bytes`` the key
    space is split and read once per slice, so the table never holds more than ``max_bytes``. Only when
    keys repeat is the input read again, for the rows that hold them, to name the duplicates exactly.
    """
    import numpy as np

    from tasks.engine.plan.key_table import KeyTable
    from tasks.engine.plan.keys import exact_id_keys

    rows = nulls = 0
    null_rows: list[int] = []
    growing, last = True, None
    for ids in _id_chunks(source, id_col, limit, chunk_size):
        if ids.null_count:
            where = np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))
            null_rows.extend(int(r) + rows for r in where[: max(0, 6 - len(null_rows))])
            nulls += ids.null_count
        if growing and len(ids):
            values = _int_values(ids)
            growing = values is not None and (last is None or values[0] > last)
            growing = growing and bool(np.all(values[1:] > values[:-1]))
            last = values[-1] if growing else None
        rows += len(ids)
    if nulls:
        shown = ", ".join(str(r + 1) for r in null_rows[:5])
        raise InputError(
            f"input {source.path}: column {id_col!r} is null in {nulls} row(s) (data rows {shown}"
            f"{', …' if nulls > 5 else ''}): every row needs an id. Fill them or pick another --id-col."
        )
    if growing:
        return rows
    slices = max(1, -(-rows * 8 // max_bytes))
    for part in range(slices):
        seen = KeyTable(payload=False)
        for ids in _id_chunks(source, id_col, limit, chunk_size):
            keys = exact_id_keys(ids)
            seen.add(keys[keys % np.uint64(slices) == part] if slices > 1 else keys)
        repeated = seen.repeated()
        seen.clear()
        if len(repeated):
            _raise_duplicates(source, id_col, limit, chunk_size, repeated)
    return rows


def _int_values(ids: pa.ChunkedArray):
    """The ids as int64 numpy values, if they are integers without nulls."""
    if not pa.types.is_integer(ids.type) or ids.null_count or ids.type == pa.uint64():
        return None
    values = ids.cast(pa.int64())
    values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    return values.to_numpy(zero_copy_only=False)


def _id_chunks(source: InputSource, id_col: str, limit: int | None, chunk_size: int) -> Iterator[pa.ChunkedArray]:
    rows = 0
    if limit is not None and limit <= 0:
        return
    for table in source.iter_chunks([id_col], chunk_size):
        if limit is not None and rows + table.num_rows > limit:
            table = table.slice(0, limit - rows)
        rows += table.num_rows
        yield table.column(id_col)
        if limit is not None and rows >= limit:
            return


def _raise_duplicates(source: InputSource, id_col: str, limit: int | None, chunk_size: int, repeated) -> None:
    """Second pass: the rows whose key repeats, compared by value (a hash key may collide)."""
    import numpy as np
    import polars as pl

    from tasks.engine.plan.keys import exact_id_keys

    values: list[pa.Array] = []
    positions: list[np.ndarray] = []
    first = 0
    for ids in _id_chunks(source, id_col, limit, chunk_size):
        hit = np.flatnonzero(np.isin(exact_id_keys(ids), repeated))
        if len(hit):
            values.append(ids.take(pa.array(hit)).combine_chunks())
            positions.append(hit + first)
        first += len(ids)
    if not values:
        return
    candidates = pl.DataFrame({"id": pl.Series(pa.chunked_array(values)), "row": np.concatenate(positions)})
    dup_mask = candidates["id"].is_duplicated()
    if not dup_mask.any():
        return
    dups = candidates.filter(dup_mask)
    ordered = dups.group_by("id", maintain_order=True).agg(pl.col("row").head(3))
    examples = [
        f"{value!r} at data rows {', '.join(str(r + 1) for r in where)}" for value, where in ordered.head(3).iter_rows()
    ]
    raise InputError(
        f"input {source.path}: column {id_col!r} has {ordered.height} duplicated id(s), e.g. "
        f"{'; '.join(examples)}. Ids must be unique: dedupe the input or pick another --id-col."
    )
