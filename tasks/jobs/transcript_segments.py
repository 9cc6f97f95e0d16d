"""A long recording sent segment by segment, each answer recorded as it comes, and the answers stitched.

Every answered segment is recorded at once in ``OUTPUT/_segments/<row content hash>/<index>.parquet``
(:class:`SegmentStore`): a killed run's rerun decodes the file again but sends only the segments not
recorded there.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.engine.job import Item, Outcome, Prepared
from tasks.engine.plan.keys import hash_keys
from tasks.jobs.audio import SEGMENT_CODECS, SILENCE_DBFS, SILENCE_PEAK, AudioError, Segment, iter_segments
from tasks.jobs.embed import estimate_text_tokens
from tasks.jobs.media import file_sha256
from tasks.jobs.media_access import MediaPolicy, MediaRefused
from tasks.redact import redact_text, redact_url

AUDIO_TOKENS_PER_SECOND = 32  # GEMINI.md
SEGMENTS_DIR = "_segments"
SEGMENT_TYPE = pa.list_(
    pa.struct([pa.field("start_s", pa.float64()), pa.field("end_s", pa.float64()), pa.field("text", pa.string())])
)


@dataclass(frozen=True, slots=True)
class SegmentText:
    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True, slots=True)
class TranscriptResult:
    transcript: str
    duration_s: float | None
    segments: list[SegmentText] | None = None


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """One encoded segment of a recording, ready to send."""

    path: str
    index: int
    format: str
    audio: bytes = field(repr=False)


def segment_dict(segment: SegmentText) -> dict[str, Any]:
    return {"start_s": segment.start_s, "end_s": segment.end_s, "text": segment.text}


def stitch(segments: list[SegmentText]) -> str:
    """A row's transcript: the segments' texts in order, one space between (silent ones left out)."""
    return " ".join(s.text.strip() for s in segments if s.text.strip())


class SegmentStore:
    """The answered segments of one recording: one small Parquet file each, written atomically."""

    def __init__(self, fs: Any, folder: str) -> None:
        self.fs = fs
        self.folder = folder

    def load(self) -> dict[int, SegmentText]:
        if not self.fs.exists(self.folder):
            return {}
        found: dict[int, SegmentText] = {}
        for path in self.fs.ls(self.folder, detail=False):
            if not path.endswith(".parquet") or path.rsplit("/", 1)[-1].startswith("."):
                continue
            try:
                with self.fs.open(path, "rb") as f:
                    row = pq.read_table(f).to_pylist()[0]
            except (OSError, pa.ArrowException, IndexError):
                continue  # unreadable: the segment is sent again
            found[int(row["index"])] = SegmentText(row["start_s"], row["end_s"], row["text"])
        return found

    def record(self, index: int, segment: SegmentText) -> None:
        table = pa.table(
            {
                "index": pa.array([index], pa.int32()),
                "start_s": pa.array([segment.start_s], pa.float64()),
                "end_s": pa.array([segment.end_s], pa.float64()),
                "text": pa.array([segment.text], pa.string()),
            }
        )
        self.fs.makedirs(self.folder, exist_ok=True)
        tmp = f"{self.folder}/.tmp-{uuid.uuid4().hex}.inprogress"
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(tmp, f"{self.folder}/{index:05d}.parquet")


def segments_of(
    path: str, segment_s: float, codec: Any, recorded: dict[int, SegmentText], policy: MediaPolicy | None = None
) -> Iterator[Segment]:
    """The recording's segments, encoded except those already recorded (their times are checked)."""
    skip = {i: (s.start_s, s.end_s) for i, s in recorded.items()}
    return iter_segments(path, segment_s, codec, skip=skip, policy=policy)


def close_segments(segments: Iterator[Segment]) -> None:
    """Close the decoder (and its file); a cancelled run may leave a decode step still running."""
    try:
        segments.close()
    except ValueError:  # "generator already executing": it ends with the thread, the file with it
        pass


def silent_message(path: str, seconds: float) -> str:
    return (
        f"{path} is silent: no sound above {SILENCE_DBFS:g} dBFS in its {seconds:.1f} s, nothing to transcribe; "
        "check the recording (muted microphone, wrong track)"
    )


def invalid_row(message: str, attempts: int = 0) -> Outcome:
    return Outcome(error_type="invalid_input", error_message=message, attempts=attempts)


@dataclass(eq=False)
class SegmentSend:
    """One long recording sent segment by segment: decoded as a stream, each segment sent as its own
    request (at most ``on_hand`` encoded at a time), the answers recorded as they come and stitched."""

    job: Any  # the TranscribeJob: its segment length, format, prompt and media policy
    ctx: Any
    item: Item
    send_part: Callable[[Any, Item], Awaitable[Outcome | None]]
    on_hand: asyncio.Semaphore
    store: SegmentStore
    recorded: dict[int, SegmentText] = field(default_factory=dict)
    texts: dict[int, SegmentText] = field(default_factory=dict)
    outcomes: dict[int, Outcome | None] = field(default_factory=dict)
    times: dict[int, tuple[float, float]] = field(default_factory=dict)
    tasks: set[asyncio.Task] = field(default_factory=set)

    @property
    def ref(self) -> Any:
        return self.item.prepared.data

    async def run(self, decoding: asyncio.Semaphore) -> Outcome | None:
        """The row's Outcome, or None if the run stopped before every segment was answered."""
        self.recorded = await asyncio.to_thread(self.store.load)
        try:
            async with decoding:
                try:
                    changed = await asyncio.to_thread(file_sha256, self.ref.path, self.job.media)
                except (MediaRefused, OSError) as exc:
                    path, reason = redact_url(self.ref.path), redact_text(str(exc))
                    return invalid_row(f"can't read audio {path} again: {reason}")
                if changed != self.ref.sha256:
                    return invalid_row(
                        f"{self.ref.path} changed during the run: run again to transcribe the current file"
                    )
                finished, broken = await self._dispatch_all()
            if self.tasks:
                await asyncio.gather(*list(self.tasks))
        finally:
            for task in list(self.tasks):
                task.cancel()
        return self._outcome(finished, broken)

    async def _dispatch_all(self) -> tuple[bool, str | None]:
        """Read the segments and start sending each; (read to the end, why the file broke off)."""
        codec = SEGMENT_CODECS[self.job.segment_format]
        segments = segments_of(self.ref.path, self.job.segment_s, codec, self.recorded, self.job.media)
        try:
            while not self.ctx.stop.event.is_set():
                await self.on_hand.acquire()
                try:
                    segment = await asyncio.to_thread(next, segments, None)
                except BaseException:
                    self.on_hand.release()
                    raise
                if segment is None:
                    self.on_hand.release()
                    return True, None
                self._dispatch(segment, codec.format)
        except AudioError as exc:
            return (
                False,
                f"{self.ref.path} {exc}: it is corrupt from there on; re-encode it (e.g. ffmpeg -i IN OUT.mp3)",
            )
        except MediaRefused as exc:
            return False, str(exc)
        except OSError as exc:
            return False, f"can't read audio {self.ref.path}: {exc}"
        finally:
            await asyncio.to_thread(close_segments, segments)
        return False, None

    def _dispatch(self, segment: Segment, fmt: str) -> None:
        """A segment already recorded or silent is done at once; any other is sent in a task of its own."""
        self.times[segment.index] = (segment.start_s, segment.end_s)
        known = self.recorded.get(segment.index)
        if known is not None and (known.start_s, known.end_s) == (segment.start_s, segment.end_s):
            done = known
        elif segment.audio is None:  # silence: nothing to send
            done = SegmentText(segment.start_s, segment.end_s, "")
        else:
            tokens = math.ceil(segment.seconds * AUDIO_TOKENS_PER_SECOND)
            if self.job.effective_prompt:
                tokens += estimate_text_tokens(self.job.effective_prompt)
            data = SegmentRef(self.ref.path, segment.index, fmt, segment.audio)
            key = f"{self.item.content_hash}:{segment.index}"
            part = Item(self.item.position, self.item.row_id, key, Prepared({}, tokens, data))
            task = asyncio.create_task(self._send_one(segment, part))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        self.texts[segment.index] = done
        self.on_hand.release()
        self.ctx.progress.add_units(segment.seconds)

    async def _send_one(self, segment: Segment, part: Item) -> None:
        try:
            outcome = await self.send_part(self.ctx, part)
        finally:
            self.on_hand.release()
        self.outcomes[segment.index] = outcome
        if outcome is not None and outcome.ok:
            text = SegmentText(segment.start_s, segment.end_s, outcome.result.transcript)
            self.texts[segment.index] = text
            await asyncio.to_thread(self.store.record, segment.index, text)
            self.ctx.progress.add_units(segment.seconds)

    def _outcome(self, finished: bool, broken: str | None) -> Outcome | None:
        outcomes = self.outcomes
        attempts = max((o.attempts for o in outcomes.values() if o is not None), default=0)
        if broken is not None:
            return invalid_row(broken, attempts)
        for index in sorted(outcomes):
            outcome = outcomes[index]
            if outcome is None:
                return None  # the run is stopping: the answered segments are recorded
            if not outcome.ok:
                start, end = self.times[index]
                where = f"segment {index} ({start:.1f}-{end:.1f} s) of {self.ref.path}"
                return Outcome(
                    error_type=outcome.error_type,
                    error_message=f"{where}: {outcome.error_message}",
                    attempts=attempts,
                    raw_reply=outcome.raw_reply,
                    retry_auto=outcome.retry_auto,
                )
        if not finished or len(self.texts) < len(self.times):
            return None  # the run is stopping: the answered segments are recorded
        ordered = [self.texts[i] for i in sorted(self.times)]
        last_end = self.times[max(self.times)][1] if self.times else 0.0
        if not outcomes and not any(i in self.recorded for i in self.times):
            return invalid_row(silent_message(self.ref.path, last_end))
        result = TranscriptResult(transcript=stitch(ordered), duration_s=last_end, segments=ordered)
        # The segments' models (one, unless the provider rerouted the model in the middle of a recording).
        served = sorted({o.served_model for o in outcomes.values() if o is not None and o.served_model})
        return Outcome(result=result, attempts=max(attempts, 1), served_model=",".join(served) or None)


def transcript_arrays(results: list[Any]) -> dict[str, pa.Array]:
    """The output columns of answered rows (their TranscriptResults)."""
    segments = [None if r.segments is None else [segment_dict(x) for x in r.segments] for r in results]
    return {
        "transcript": pa.array([r.transcript for r in results], pa.string()),
        "duration_s": pa.array([r.duration_s for r in results], pa.float64()),
        "segments": pa.array(segments, SEGMENT_TYPE),
    }


def transcripts_from_table(table: pa.Table) -> dict[str, Any]:
    """The TranscriptResults of an output table, by content hash."""
    names = ("content_hash", "transcript", "duration_s")
    columns = [table.column(c).to_pylist() for c in names]
    segments = table.column("segments").to_pylist() if "segments" in table.column_names else [None] * len(table)
    return {
        h: TranscriptResult(
            transcript=t,
            duration_s=d,
            segments=None if s is None else [SegmentText(x["start_s"], x["end_s"], x["text"]) for x in s],
        )
        for h, t, d, s in zip(*columns, segments)
    }


def tidy_segments(store: Any, index: Any) -> int:
    """Remove the recorded segments of rows now in the output; returns the folders removed."""
    folder = f"{store.root}/{SEGMENTS_DIR}"
    if not store.fs.exists(folder):
        return 0
    rows = [p.rstrip("/") for p in store.fs.ls(folder, detail=False)]
    names = [p.rsplit("/", 1)[-1] for p in rows]
    if not names:
        return 0
    done = index.contents_stored(hash_keys(names))
    removed = 0
    for path, is_done in zip(rows, done.tolist()):
        if is_done:
            store.fs.rm(path, recursive=True)
            removed += 1
    if removed == len(rows):
        store.fs.rm(folder, recursive=True)
    return removed


@dataclass(frozen=True, slots=True)
class _Measured:
    end_s: float
    silent: bool


def measure_recording(path: str, segment_s: float, policy: MediaPolicy | None = None) -> _Measured:
    """Decode a recording (nothing encoded): its decoded length, and whether it is all silence."""
    end, silent = 0.0, True
    for segment in iter_segments(path, max(segment_s, 1.0), None, policy=policy):
        end = segment.end_s
        silent = silent and segment.peak < SILENCE_PEAK
    return _Measured(end, silent)


def whole_outcome(ref: Any, measured: Any, outcome: Outcome) -> Outcome:
    text = outcome.result.transcript
    segment = SegmentText(0.0, measured.end_s, text)
    result = TranscriptResult(transcript=text, duration_s=ref.duration_s or measured.end_s, segments=[segment])
    return Outcome(result=result, attempts=outcome.attempts, served_model=outcome.served_model)
