"""A child process that hashes text columns for :class:`tasks.engine.plan.hashing.HashProcesses`.

Kept to the standard library (it starts in ~30 ms and holds a few MB): it reads requests on stdin and
writes the digests on stdout. A request is a header ``<IIIQ``: the head's and tail's lengths, the row
count ``n`` and the data's length; then head, tail, ``n + 1`` uint64 offsets into the data, the data.
The answer is ``32 * n`` bytes: sha256(head + data[offsets[i]:offsets[i + 1]] + tail) for each row.
"""

from __future__ import annotations

import hashlib
import signal
import struct
import sys

HEADER = struct.Struct("<IIIQ")


def serve() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it closes stdin
    read, out = sys.stdin.buffer.read, sys.stdout.buffer
    while True:
        header = read(HEADER.size)
        if len(header) < HEADER.size:
            return
        head_len, tail_len, n, data_len = HEADER.unpack(header)
        head, tail = read(head_len), read(tail_len)
        offsets = memoryview(read(8 * (n + 1))).cast("Q")
        data = memoryview(read(data_len))
        start = hashlib.sha256(head)
        digests = []
        for i in range(n):
            h = start.copy()
            h.update(data[offsets[i] : offsets[i + 1]])
            h.update(tail)
            digests.append(h.digest())
        out.write(b"".join(digests))
        out.flush()


if __name__ == "__main__":
    serve()
