"""The parts of a run's context, one for each thing it tracks: the stop, the work on hand, the output, the progress.

:class:`~tasks.engine.send.context.RunContext` holds one of each. Those that hold big things (the
done-key index, prepared chunks) are plain classes for the reason RunContext gives.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.engine.job import Outcome
from tasks.engine.plan.done import DoneIndex
from tasks.engine.plan.hashing import HashProcesses
from tasks.engine.plan.rows import ChunkKeys, PreparedChunk, chunk_statuses
from tasks.engine.store.output import OutputStore
from tasks.errors import RunStopped


@dataclass
class Stop:
    """Whether the run was asked to stop (``event``) and the first reason it was given (``reason``,
    the one the run reports)."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    reason: RunStopped | None = None

    def request(self, reason: RunStopped) -> None:
        if self.reason is None:
            self.reason = reason
        self.event.set()


class WorkOnHand:
    """What a run holds at one moment: the requests in flight, the chunks prepared ahead or being
    prepared, the processes that hash them, and what a job keeps for the length of the run."""

    def __init__(self) -> None:
        # Requests in flight, by content hash: a later row with the same contents waits for the answer.
        self.inflight: dict[str, asyncio.Future[Outcome | None]] = {}
        # Chunks prepared by the driver (precheck_chunk), by chunk number, until their task runs.
        self.prechecked: dict[int, PreparedChunk] = {}
        # Chunks between starting and queueing their requests (the driver waits for them before
        # deciding the limiter is starved of work).
        self.preparing = 0
        # Child processes that hash text columns (a text job's run; see tasks/engine/plan/hashing.py).
        self.hash_processes: HashProcesses | None = None
        # What a job keeps for the length of one run, by job (a recording job's bound on segments on hand).
        self.kept: dict[str, Any] = {}


class RunOutput:
    """The output a run writes into, as the run sees it: where it is, what it holds already, its id
    column (the input's too), and what the run learnt about it before sending."""

    def __init__(self, *, store: OutputStore, index: DoneIndex, id_col: str, retry_errors: bool = False) -> None:
        self.store = store
        self.index = index
        self.id_col = id_col
        # Whether rows the output records as failed are sent again.
        self.retry_errors = retry_errors
        # Sorted hash keys of the contents that recur in the input (tasks/engine/plan/recurring.py): the
        # only results of this run that the index must learn (a later row may reuse them). None: all.
        self.recurring: np.ndarray | None = None
        # Whether result parts get a served_model column (not in an output made before it existed, so
        # that its parts keep one schema).
        self.served_column = True

    def statuses(self, ids: pa.Array | pa.ChunkedArray, ready: PreparedChunk) -> ChunkKeys:
        """What the output says of each row of a prepared chunk (:func:`~tasks.engine.plan.rows.chunk_statuses`)."""
        return chunk_statuses(
            self.index, ids, ready.keys, ready.invalid, retry_errors=self.retry_errors, done=ready.done
        )


class ProgressSink:
    """Where a run tells its progress as rows get done; this one tells nobody (a run hands in its
    progress bar, tasks/engine/report/progress.py)."""

    def advance(self, rows: int) -> None:
        """``rows`` more rows are done (sent, skipped or failed)."""

    def add_units(self, seconds: float) -> None:
        """For a job that measures its work in something besides rows: ``seconds`` more of audio done."""
