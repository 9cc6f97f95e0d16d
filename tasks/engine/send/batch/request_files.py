"""Request files being filled in a submit pass: lines added until a file is full, then it is submitted."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from tasks.engine.job import Item
from tasks.engine.send.batch.records import RequestFile, request_line
from tasks.engine.send.batch.shared import BatchShared
from tasks.engine.send.batch.upload import submit_file


class RequestFiles:
    """The request file being filled (``current``) and the lines submitted in this pass (``submitted``).

    ``in_progress``: the claim of the chunk whose lines are being added (kept when a full file is
    submitted: the chunk's next lines go into the next file)."""

    def __init__(self, shared: BatchShared) -> None:
        self.shared = shared
        self.made = 0  # files named so far in this run
        self.endpoint = ""
        self.current: RequestFile | None = None
        self.submitted = 0
        self.in_progress: str | None = None

    def start_pass(self) -> None:
        self.current = None
        self.submitted = 0
        self.in_progress = None

    async def add_lines(self, groups: list[tuple[Item, list[tuple[Any, int]]]], key: str) -> bool:
        """Add the items as lines of the current request file (a new one when it is full: the full one is
        submitted). False if the request file was dropped (nothing holds the rows), else True."""
        shared = self.shared
        current, size = self.current, shared.ctx.job.max_items_per_request
        for start in range(0, len(groups), size):
            part = groups[start : start + size]
            items = [item for item, _ in part]
            endpoint, body = await shared.routes.request_of(items)
            if current is None:
                current = self.current = self._new_file(key)
            custom_id = f"{current.name}-{current.counts.lines:05d}"
            line = request_line(custom_id, endpoint, body)
            if not current.fits(len(items), len(line), shared.policy, endpoint):
                self.current = None
                self.submitted += await self._submit(current, endpoint)
                if shared.unavailable is not None:
                    return False  # the request file was dropped: nothing holds these rows
                if shared.ctx.stop.event.is_set():
                    return True
                current = self.current = self._new_file(key)
                custom_id = f"{current.name}-{current.counts.lines:05d}"
                line = request_line(custom_id, endpoint, body)
            rows = [(i, row_id, input_row) for i, (_, members) in enumerate(part) for row_id, input_row in members]
            current.add_line(line, items, rows, custom_id)
            self.endpoint = endpoint
        return True

    async def end_pass(self) -> None:
        """The last file of a pass: submitted, or dropped when the run stops or (``auto``) it is too small
        to be worth a batch (its rows are sent live after)."""
        shared, current = self.shared, self.current
        if current is not None and current.counts.lines:
            stopping = shared.ctx.stop.event.is_set()
            if shared.auto and current.counts.lines < shared.policy.auto_min_requests and not stopping:
                self.discard(current)
            elif not stopping:
                self.submitted += await self._submit(current, self.endpoint)
            else:
                self.discard(current)
            self.current = None

    def drop_current(self) -> None:
        if self.current is not None:
            self.discard(self.current)
            self.current = None

    def discard(self, request_file: RequestFile) -> None:
        """A request file not submitted: its rows are free again for any run (live, in auto mode)."""
        request_file.discard(self.shared.book)
        for key in request_file.claims:
            if key != self.in_progress:
                self.shared.claims.release(key)

    async def _submit(self, request_file: RequestFile, endpoint: str) -> int:
        return await submit_file(self.shared, request_file, endpoint, keep=self.in_progress, discard=self.discard)

    def _new_file(self, key: str) -> RequestFile:
        self.made += 1
        shared = self.shared
        name = f"{shared.ctx.run_id}-{self.made:04d}"
        request_file = RequestFile(shared.book, name, shared.results.id_type or pa.int64())
        request_file.claims.add(key)
        return request_file


def one_item_per_content(
    positions: np.ndarray, ids: list[Any], hashes: list[str], prepared: Any, first_row: int
) -> dict[str, tuple[Item, list[tuple[Any, int]]]]:
    """One item per content, by content hash; every row of that content (id, input row) rides on it."""
    owners: dict[str, tuple[Item, list[tuple[Any, int]]]] = {}
    for pos in positions.tolist():
        h = hashes[pos]
        if h in owners:
            owners[h][1].append((ids[pos], first_row + pos))
        else:
            owners[h] = (Item(pos, ids[pos], h, prepared[pos]), [(ids[pos], first_row + pos)])
    return owners
