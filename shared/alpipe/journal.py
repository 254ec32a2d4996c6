"""The local store's write-ahead journal: a new object is durable after one in-place write.

Written the ordinary way (a temporary file, fsync, link, directory fsync), an object costs two
filesystem commits, and beside a trainer and scorers each can take 10 ms or more. Label posts wait
on that write, so the local store gives new objects a cheaper one: `LocalStore.put_new` appends the
object to a segment file that was filled with zeros and fsynced beforehand, with one `O_DSYNC`
write. That write changes no metadata a reader needs (the file's size and blocks are on disk
already), so it is one data write to the device and no filesystem commit. A background thread then
makes the journaled objects ordinary files, many at a time (one pair of commits per batch), and
deletes a segment once every object in it is a durable file.

Readers see no difference: before `LocalStore.list` (and after a `get_bytes` miss), a
`JournalReader` makes files of the journaled objects that are not files yet, from every process's
segments. A segment whose writer died (nobody holds its flock) is made into files and deleted by
whichever process reads next, so a crash between the journal write and the file loses nothing.

Segment layout: an 8-byte magic, then entries: a header (magic, key length, data length, CRC-32 of
key and data), the key (UTF-8), the data. The first header that is not an entry's, or whose CRC does
not match (a write a crash cut short: it was never acknowledged), ends what a reader takes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SEGMENT_MAGIC = b"ALPJRN01"
_ENTRY = struct.Struct("<4sIII")
_ENTRY_MAGIC = b"ENT1"
SEGMENT_SUFFIX = ".seg"
_ZEROS = bytes(1 << 20)

# Materialize(entries) makes every (key, data) an ordinary, durable object (skipping keys that exist).
Materialize = Callable[[list[tuple[str, bytes]]], None]


def encode_entry(key: str, data: bytes) -> bytes:
    raw_key = key.encode()
    return _ENTRY.pack(_ENTRY_MAGIC, len(raw_key), len(data), zlib.crc32(raw_key + data)) + raw_key + data


def read_entries(fd: int, offset: int, end: int) -> tuple[list[tuple[str, bytes]], int]:
    """The complete entries of a segment from offset up to end, and the offset after the last of them."""
    entries = []
    while offset + _ENTRY.size <= end:
        magic, key_len, data_len, crc = _ENTRY.unpack(os.pread(fd, _ENTRY.size, offset))
        size = _ENTRY.size + key_len + data_len
        if magic != _ENTRY_MAGIC or offset + size > end:
            break
        body = os.pread(fd, key_len + data_len, offset + _ENTRY.size)
        if len(body) < key_len + data_len or zlib.crc32(body) != crc:
            break
        entries.append((body[:key_len].decode(), body[key_len:]))
        offset += size
    return entries, offset


def fsync_dir(folder: Path) -> None:
    """Flush a directory's entries (a new name is durable only once its directory is)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(eq=False)
class _Segment:
    path: Path
    lock_fd: int  # holds the flock that tells readers the writer is alive
    write_fd: int  # O_DSYNC: a write returns once its data is on the device
    offset: int = len(SEGMENT_MAGIC)
    written: int = 0  # entries appended
    durable: int = 0  # of them, entries that are durable files now
    sealed: bool = False  # no more appends: deleted once every entry is a file

    def close(self) -> None:
        os.close(self.write_fd)
        os.close(self.lock_fd)


def _removed(segment: _Segment) -> bool:
    """Whether the segment's file was deleted under its writer (the journal folder removed by hand):
    a write there would be acknowledged into a file nobody can read again."""
    return os.fstat(segment.write_fd).st_nlink == 0


def _new_segment(folder: Path, size: int) -> _Segment:
    """A zero-filled, fsynced segment, locked before its name appears (a reader never takes it for orphaned)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=SEGMENT_SUFFIX)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, SEGMENT_MAGIC)
        left = size - len(SEGMENT_MAGIC)
        while left > 0:
            left -= os.write(fd, _ZEROS[:left])
        os.fsync(fd)
        path = folder / f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SEGMENT_SUFFIX}"
        os.rename(tmp, path)
        fsync_dir(folder)  # the segment's name must survive a crash as surely as what is written in it
        return _Segment(path=path, lock_fd=fd, write_fd=os.open(path, os.O_WRONLY | os.O_DSYNC))
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise


class Journal:
    """One process's journal of one store: appends in order under a lock, files made in the background."""

    def __init__(self, folder: Path, materialize: Materialize, *, segment_bytes: int = 4 << 20,
                 background: bool = True):
        self.folder = folder
        self.segment_bytes = segment_bytes
        self._materialize = materialize
        self._lock = threading.Lock()  # appends: one segment, one offset
        self._changed = threading.Condition()  # pending entries and segments, for the background thread
        self._active: _Segment | None = None
        self._spare: _Segment | None = None
        self._pending: list[tuple[_Segment, str, bytes]] = []
        self._segments: list[_Segment] = []
        self._closing = False
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="alpipe-journal", daemon=True)
            self._thread.start()

    def fits(self, key: str, data: bytes) -> bool:
        """Whether an object fits in one segment (a bigger one is written as a file directly)."""
        return _ENTRY.size + len(key.encode()) + len(data) <= self.segment_bytes - len(SEGMENT_MAGIC)

    def append(self, key: str, data: bytes) -> None:
        """Durable when this returns (one O_DSYNC write); the file follows in the background."""
        entry = encode_entry(key, data)
        with self._lock:
            segment = self._active
            if segment is not None and _removed(segment):
                self._seal(segment)  # what it held is pending in memory and still becomes files
                segment = None
            if segment is None or segment.offset + len(entry) > self.segment_bytes:
                segment = self._roll()
            try:
                written = os.pwrite(segment.write_fd, entry, segment.offset)
                if written != len(entry):
                    raise OSError(f"short write to {segment.path}: {written} of {len(entry)} bytes")
            except BaseException:
                # Nothing in a segment is ever written over, so what a reader has taken from it never
                # changes: whatever of this entry reached the device stays, and the next append rolls.
                self._seal(segment)
                raise
            segment.offset += len(entry)
            segment.written += 1
        with self._changed:
            self._pending.append((segment, key, data))
            self._changed.notify()

    def flush(self) -> None:
        """Make every journaled object a file now and delete the segments that no longer hold anything."""
        with self._changed:
            batch, self._pending = self._pending, []
        self._make_files(batch)

    def close(self) -> None:
        """Stop the background thread, make files of what is journaled, and delete every segment."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            if self._active is not None:
                self._seal(self._active)
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.path.unlink(missing_ok=True)
            spare.close()
        self.flush()

    # --- inside the lock ---------------------------------------------------------------------------

    def _roll(self) -> _Segment:
        if self._active is not None:
            self._seal(self._active)
        segment, self._spare = self._spare, None
        if segment is not None and _removed(segment):
            segment.close()
            segment = None
        if segment is None:
            self.folder.mkdir(exist_ok=True)
            segment = _new_segment(self.folder, self.segment_bytes)
        with self._changed:
            self._segments.append(segment)
            self._changed.notify()  # the background thread makes the next spare
        self._active = segment
        return segment

    def _seal(self, segment: _Segment) -> None:
        segment.sealed = True
        if segment is self._active:
            self._active = None

    # --- the background thread ---------------------------------------------------------------------

    def _run(self) -> None:
        failing = False  # logged once per streak of failures, and once when files are made again
        while True:
            with self._changed:
                while not (self._pending or self._closing or self._spare_wanted()):
                    self._changed.wait()
                if self._closing:
                    return
                batch, self._pending = self._pending, []
            try:
                self._make_files(batch)
                if self._spare_wanted():
                    spare = _new_segment(self.folder, self.segment_bytes)
                    with self._lock:
                        self._spare = spare
                if failing:
                    failing = False
                    log.warning("journal %s: making files again", self.folder)
            except Exception as e:  # the store is away or refuses writes: the journal keeps the objects
                if not failing:
                    failing = True
                    log.warning("journal %s: cannot make files of the journaled objects (%s: %s); they are "
                                "durable in the journal, and this retries every second", self.folder,
                                e.__class__.__name__, e)
                time.sleep(1.0)

    def _spare_wanted(self) -> bool:
        return self._active is not None and self._spare is None and not self._closing

    def _make_files(self, batch: list[tuple[_Segment, str, bytes]]) -> None:
        if batch:
            try:
                self._materialize([(key, data) for _segment, key, data in batch])
            except BaseException:
                with self._changed:
                    self._pending[:0] = batch  # first again next time, in order
                raise
            for segment, _key, _data in batch:
                segment.durable += 1
        with self._changed:  # an entry still pending is one not durable yet: durable < written
            done = [s for s in self._segments if s.sealed and s.durable == s.written]
            self._segments = [s for s in self._segments if s not in done]
        for segment in done:
            segment.path.unlink(missing_ok=True)
            segment.close()


class JournalReader:
    """Makes files of every process's journaled objects: what a reader runs before it lists."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._taken: dict[str, int] = {}  # segment name -> offset up to which its entries are files
        self._lock = threading.Lock()

    def settle(self, materialize: Materialize) -> None:
        try:
            names = sorted(n for n in os.listdir(self.folder)
                           if n.endswith(SEGMENT_SUFFIX) and not n.startswith(".tmp-"))
        except FileNotFoundError:
            return
        with self._lock:
            for gone in set(self._taken) - set(names):
                del self._taken[gone]
            for name in names:
                self._settle_segment(name, materialize)

    def _settle_segment(self, name: str, materialize: Materialize) -> None:
        path = self.folder / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # its writer made files of it all and deleted it meanwhile
            self._taken.pop(name, None)
            return
        try:
            if os.pread(fd, len(SEGMENT_MAGIC), 0) != SEGMENT_MAGIC:
                return  # not a segment of this format: left alone
            try:  # first, so that an orphan is read to its true end (its writer may have died just now)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                orphaned = True  # its writer is gone: nothing more will be appended
            except BlockingIOError:
                orphaned = False
            start = self._taken.get(name, len(SEGMENT_MAGIC))
            entries, end = read_entries(fd, start, os.fstat(fd).st_size)
            if entries:
                materialize(entries)
            self._taken[name] = end
            if orphaned:
                path.unlink(missing_ok=True)
                self._taken.pop(name, None)
        finally:
            os.close(fd)
