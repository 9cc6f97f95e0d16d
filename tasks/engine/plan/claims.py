"""Claims: which run is working on what in one output folder, so two runs never pay for a row twice.

Layout (inside the output; "_" keeps Arrow's dataset discovery off it)::

    OUTPUT/_claims/run-<run-id>.json          one per live run: its lease on the folder
    OUTPUT/_claims/chunk-<key>.<gen>.json     one per chunk in flight: who sends its rows
    OUTPUT/_claims/compact.<gen>.json         the run compacting the folder (one at a time)
    OUTPUT/_claims/batch-<name>.<gen>.json    the run submitting, polling and writing a batch record

A claim is created with an exclusive create (on local disk a hard link of the written file, which
fails if the name exists, or ``O_CREAT | O_EXCL``; fsspec's ``pipe_file(..., mode="create")``
elsewhere, which s3fs and gcsfs turn into a conditional write) and
holds the run id, host, pid, when it was taken and when it was last renewed. A heartbeat thread renews
the run's lease and its chunk claims every ``heartbeat_s``; the chunk claim is removed once the chunk's
parts are written. A claim is **stale** when it was not renewed for ``ttl_s`` (its process was killed
or its machine lost), or at once when its host is this host and its pid is gone.

Taking over a stale claim never deletes it first (two runs could then both create a fresh one): the
claim's generation goes up by one (``.<gen+1>.json``, created exclusively, so one run wins), and the
holder is always the highest generation present. The stale file is removed after.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tasks.engine.plan.claim_files import HOST, TMP_PREFIX, ClaimFiles
from tasks.engine.plan.heartbeat import Heartbeat

__all__ = ["COMPACT_KEY", "ClaimPolicy", "ClaimBook", "Holder", "batch_key", "chunk_key"]

log = logging.getLogger("gembatch.claims")

# A heartbeat every 10 s and stale after 60 s: a chunk's claim survives five missed heartbeats (a
# loaded machine, a slow object store), and a run killed on another machine frees its chunks within a
# minute. On the same machine a dead pid frees them at once.
DEFAULT_TTL_S = 60.0
DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_POLL_S = 1.0
COMPACT_KEY = "compact"
BATCH_PREFIX = "batch-"


@dataclass(frozen=True, kw_only=True)
class ClaimPolicy:
    """How often a run renews its claims (``heartbeat_s``), when an unrenewed claim counts as
    abandoned (``ttl_s``), and how often a run waiting for another's chunks looks again (``poll_s``)."""

    ttl_s: float = DEFAULT_TTL_S
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    poll_s: float = DEFAULT_POLL_S

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise ValueError(f"claims: heartbeat_s ({self.heartbeat_s}) must be above 0 and below ttl_s ({self.ttl_s})")
        if self.poll_s <= 0:
            raise ValueError("claims: poll_s must be positive")


@dataclass(frozen=True)
class Holder:
    """Who holds a claim, read from its file."""

    run_id: str
    host: str
    pid: int
    since: float  # when the claim was taken (epoch seconds)
    renewed: float  # its last heartbeat (epoch seconds)
    path: str

    @classmethod
    def read(cls, fs: Any, path: str) -> Holder | None:
        """None: the file is gone (released). A file that can't be read (being written on a store
        whose writes aren't atomic, or cut by a crash) counts from its modification time."""
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            return cls(doc["run_id"], doc["host"], int(doc["pid"]), float(doc["since"]), float(doc["renewed"]), path)
        except (ValueError, KeyError, TypeError):
            when = _modified(fs, path)
            return cls("(unreadable claim)", "?", -1, when, when, path)

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.renewed

    def is_stale(self, policy: ClaimPolicy, now: float | None = None) -> bool:
        if self.age(now) > policy.ttl_s:
            return True
        return self.host == HOST and self.pid > 0 and not _pid_alive(self.pid)

    def why_stale(self, policy: ClaimPolicy) -> str:
        if self.host == HOST and self.pid > 0 and not _pid_alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        return f"it was not renewed for {self.age():.0f} s (more than {policy.ttl_s:g} s)"

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"run {self.run_id} on host {self.host} (pid {self.pid}) since {since}"


def chunk_key(ids: Sequence[Any], content_hashes: Sequence[str]) -> str:
    """A chunk's identity: its ids and content hashes, so every run over the same input (any
    options that leave the content alone: --retry-errors, a restart, a schedule) names it alike."""
    digest = hashlib.sha256()
    for row_id, h in zip(ids, content_hashes, strict=True):
        digest.update(repr(row_id).encode())
        digest.update(b"\x00")
        digest.update(h.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


class ClaimBook:
    """One run's claims in one output folder. Blocking calls (file system): call them from a worker
    thread in async code. The heartbeat runs on its own thread, so a busy event loop can't starve it."""

    def __init__(self, fs: Any, root: str, run_id: str, policy: ClaimPolicy | None = None) -> None:
        self.files = ClaimFiles(fs, root, run_id)
        self.policy = policy or ClaimPolicy()
        self.since = time.time()
        self._held: dict[str, str] = {}  # key -> path of our claim file
        self._lock = threading.Lock()
        self.heartbeat = Heartbeat(
            self._renew,
            interval_s=self.policy.heartbeat_s,
            lapse_s=self.policy.ttl_s,
            name=f"gembatch-claims-{run_id}",
        )
        # Other runs seen working on the folder during this run (run id -> holder): they may have
        # written parts this run's scan didn't see, and they decide who compacts.
        self.others_seen: dict[str, Holder] = {}
        self.taken_over = 0
        self.declined = 0  # chunks left to another run's live claim (then checked again at the end)
        self._told: set[str] = set()  # holders this run said it leaves chunks to
        self.waited_s = 0.0  # time spent waiting at the end for chunks other runs held
        self._lease_on = True

    @property
    def fs(self) -> Any:
        return self.files.fs

    @property
    def folder(self) -> str:
        return self.files.folder

    @property
    def run_id(self) -> str:
        return self.files.run_id

    # -- the run's lease ----------------------------------------------------------------------------
    def start(self) -> None:
        self.fs.makedirs(self.folder, exist_ok=True)
        self.files.write(self.files.lease_path(), self.files.body(self.since))
        self.heartbeat.start()

    def stop(self) -> None:
        """Stop the heartbeat and release every claim (the chunks still held and the run's lease)."""
        self.heartbeat.stop()
        with self._lock:
            paths = list(self._held.values())
            self._held.clear()
        for path in [*paths, self.files.lease_path()]:
            self.files.remove(path)

    def other_runs(self) -> list[Holder]:
        """Live leases of other runs on the folder (stale ones of dead runs are removed on the way)."""
        live = []
        for name in self.files.names():
            if not name.startswith("run-") or name == self.files.lease_path().rsplit("/", 1)[-1]:
                continue
            holder = Holder.read(self.fs, f"{self.folder}/{name}")
            if holder is None:
                continue
            if holder.is_stale(self.policy):
                self.files.remove(holder.path)
                continue
            live.append(holder)
            self.others_seen.setdefault(holder.run_id, holder)
        return live

    def describe(self) -> dict[str, Any]:
        """For the run metadata."""
        return {
            "ttl_s": self.policy.ttl_s,
            "heartbeat_s": self.policy.heartbeat_s,
            "declined_chunks": self.declined,
            "waited_s": round(self.waited_s, 3),
            "taken_over": self.taken_over,
            "other_runs": sorted(self.others_seen),
        }

    # -- chunk claims -------------------------------------------------------------------------------
    def decline(self, holder: Holder, chunk: str, doing: str) -> None:
        """This run leaves ``chunk`` (its description) to ``holder``, which is ``doing`` it: counted, and
        said the first time this run leaves a chunk to that holder."""
        self.declined += 1
        if holder.run_id not in self._told:
            self._told.add(holder.run_id)
            log.warning(
                "%s is being %s by %s: this run leaves that run's chunks to it, goes on with the rest, "
                "and checks them again at the end",
                chunk,
                doing,
                holder.describe(),
            )

    def acquire(self, key: str) -> Holder | None:
        """Claim ``key`` for this run: None if this run holds it now, else the live holder."""
        prefix = _prefix(key)
        gens = sorted(
            int(g) for name in self.files.names() if name.startswith(prefix) and (g := name[len(prefix) : -5]).isdigit()
        )
        gen, stale = 0, None
        if gens:
            top = f"{self.folder}/{prefix}{gens[-1]}.json"
            holder = Holder.read(self.fs, top)
            if holder is None:
                return self.acquire(key)  # released since the listing: look again
            if not holder.is_stale(self.policy):
                self._saw(holder)
                return holder
            gen, stale = gens[-1] + 1, holder
        path = f"{self.folder}/{prefix}{gen}.json"
        if not self.files.create(path, self.files.body(time.time())):
            holder = Holder.read(self.fs, path)
            if holder is not None:  # another run was quicker
                self._saw(holder)
                return holder
            return self.acquire(key)  # it was released in between: try again
        with self._lock:
            self._held[key] = path
        if stale is not None:
            self.taken_over += 1
            log.warning("taking over a claim of %s: %s (%s)", stale.describe(), stale.why_stale(self.policy), path)
        for old in gens:
            self.files.remove(f"{self.folder}/{prefix}{old}.json")
        return None

    def holder_of(self, key: str) -> Holder | None:
        """The live holder of ``key``, or None if nobody holds it (released, or the holder is stale)."""
        return self.holders_of([key])[key]

    def holders_of(self, keys: Sequence[str]) -> dict[str, Holder | None]:
        """:meth:`holder_of` for many keys, with one listing of the folder."""
        names = self.files.names()
        found: dict[str, Holder | None] = {}
        for key in keys:
            prefix = _prefix(key)
            gens = [int(g) for name in names if name.startswith(prefix) and (g := name[len(prefix) : -5]).isdigit()]
            holder = Holder.read(self.fs, f"{self.folder}/{prefix}{max(gens)}.json") if gens else None
            found[key] = None if holder is None or holder.is_stale(self.policy) else holder
        return found

    def sweep(self) -> int:
        """Remove the claims of dead runs (a chunk claim nobody needed to take over, a lease): call it
        only while no other run works on the folder. Returns the files removed."""
        removed = 0
        for name in self.files.names():
            path = f"{self.folder}/{name}"
            if name.startswith(TMP_PREFIX):
                self.files.remove(path)
                removed += 1
                continue
            holder = Holder.read(self.fs, path)
            if holder is not None and holder.run_id != self.run_id and holder.is_stale(self.policy):
                self.files.remove(path)
                removed += 1
        return removed

    def end_lease(self) -> None:
        """This run stops working on the folder (its chunks are done); the heartbeat goes on for what
        it still holds (the compaction claim)."""
        with self._lock:
            self._lease_on = False
            self.files.remove(self.files.lease_path())

    def release(self, key: str) -> None:
        with self._lock:
            path = self._held.pop(key, None)
            if path is not None:
                self.files.remove(path)

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    # -- helpers ------------------------------------------------------------------------------------
    def _saw(self, holder: Holder) -> None:
        if holder.run_id != self.run_id:
            self.others_seen.setdefault(holder.run_id, holder)

    def tick(self) -> None:
        """The run is making progress (called from its event loop every heartbeat)."""
        self.heartbeat.tick()

    def _renew(self) -> None:
        """Renew the run's lease and every claim it holds (on the heartbeat's thread)."""
        now = time.time()
        try:
            with self._lock:
                if self._lease_on:
                    self.files.write(self.files.lease_path(), self.files.body(self.since, now))
                held = list(self._held.items())
            for key, path in held:
                with self._lock:  # not while release() removes it: that would bring it back
                    if self._held.get(key) != path:
                        continue
                    current = Holder.read(self.fs, path)
                    if current is None or current.run_id != self.run_id:
                        # Judged stale and taken over by another run (a stall longer than ttl_s):
                        # both send this chunk now; its part is the same either way.
                        del self._held[key]
                        log.warning("this run's claim %s was taken over by another run", path)
                        continue
                    self.files.write(path, self.files.body(current.since, now))
        except Exception as exc:  # noqa: BLE001 - a failed renewal is retried at the next beat
            log.warning("could not renew this run's claims in %s: %s", self.folder, exc)


def _modified(fs: Any, path: str) -> float:
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return time.time()
    value = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("last_modified")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return time.time()


def batch_key(name: str) -> str:
    """The claim on a batch record (``OUTPUT/_batches/<name>.json``): who submits, polls and writes it."""
    return f"{BATCH_PREFIX}{name}"


def _prefix(key: str) -> str:
    if key == COMPACT_KEY or key.startswith(BATCH_PREFIX):
        return f"{key}."
    return f"chunk-{key}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed child its parent has not reaped yet is a zombie: it sends nothing any more.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True
