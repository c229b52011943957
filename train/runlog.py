"""run.log, written by the trusted harness alone.

A sandboxed child never holds a descriptor of a file the trusted side reads: what it prints goes
into a pipe that this side drains on a thread of its own, a line at a time, into run.log, up to a
cap (beyond it the bytes are read and dropped, so the child never blocks on a full pipe). A shared
log descriptor was a channel: two sandboxed processes that inherit one file can talk through its
size, its holes or its offset; a pipe whose only reader is the harness carries nothing back.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

CAP_BYTES = 16 << 20  # of the sandbox's output kept in run.log
READ_BYTES = 1 << 16
MAX_LINE = 1 << 16  # a "line" longer than this is written as it comes


class RunLog:
    def __init__(self, path: Path, cap_bytes: int = CAP_BYTES):
        self.path, self.cap = Path(path), cap_bytes
        self._lock = threading.Lock()
        self._kept = self._dropped = 0
        self._drains: list[threading.Thread] = []

    def line(self, text: str) -> None:
        """One line of the harness's own."""
        self._write((text + "\n").encode(errors="replace"))

    def pipe(self) -> int:
        """The write end of a pipe for a child's stdout and stderr (the caller passes it on and
        closes it); what comes through is kept in run.log, up to the cap."""
        read_end, write_end = os.pipe()
        thread = threading.Thread(target=self._drain, args=(read_end,), name="runlog-drain", daemon=True)
        thread.start()
        self._drains.append(thread)
        return write_end

    def close(self, timeout: float = 5.0) -> None:
        """Wait for the drains to see their pipes close (every writer dead), then say what was dropped."""
        for thread in self._drains:
            thread.join(timeout)
        self._drains = [t for t in self._drains if t.is_alive()]
        if self._dropped:
            self.line(f"harness: {self._dropped} bytes of the sandbox's output past the {self.cap >> 20} MB "
                      "cap of run.log were dropped")
            self._dropped = 0

    def _drain(self, fd: int) -> None:
        pending = b""
        try:
            while chunk := os.read(fd, READ_BYTES):
                pending += chunk
                cut = pending.rfind(b"\n") + 1 if len(pending) < MAX_LINE else len(pending)
                if cut:
                    self._take(pending[:cut])
                    pending = pending[cut:]
        except OSError:
            pass
        finally:
            if pending:
                self._take(pending + b"\n")
            os.close(fd)

    def _take(self, data: bytes) -> None:
        room = max(0, self.cap - self._kept)
        if len(data) > room:
            self._dropped += len(data) - room
            data = data[:room]
        if data:
            self._kept += len(data)
            self._write(data)

    def _write(self, data: bytes) -> None:
        with self._lock, open(self.path, "ab") as out:
            out.write(data)
