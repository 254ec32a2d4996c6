"""One ObjectStore interface, two backends: a local directory (default) and S3/MinIO."""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import NotFound, StoreUnavailable
from .journal import Journal, JournalReader, fsync_dir

log = logging.getLogger(__name__)


class ObjectStore(ABC):
    """Keys are '/'-separated strings; values are bytes. Writes of one key are atomic.

    A backend that cannot be reached raises StoreUnavailable (never an empty answer), and logs one
    line when an outage starts and one when the store answers again.
    """

    _down: str | None = None  # why the store is unavailable, while it is

    def _unavailable(self, cause: BaseException) -> StoreUnavailable:
        why = f"{cause.__class__.__name__}: {cause}"
        if self._down is None:
            log.warning("object storage (%s) is unavailable: %s", self.describe(), why)
        self._down = why
        return StoreUnavailable(f"object storage ({self.describe()}) is unavailable: {why}; retry shortly")

    def _answered(self) -> None:
        if self._down is not None:
            self._down = None
            log.warning("object storage (%s) is available again", self.describe())

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; raises NotFound when the key does not exist."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under prefix, in lexicographic order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove key; removing a missing key is not an error."""

    @abstractmethod
    def describe(self) -> str:
        """Where the objects live, for logs and /health."""

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write key only when it does not exist yet; True when this call wrote it.

        Used for immutable objects (checkpoints, label batches) written by at-least-once jobs.
        The base version is check-then-put; backends override it where they can do better.
        """
        if self.exists(key):
            return False
        self.put_bytes(key, data)
        return True

    def put_new(self, key: str, data: bytes) -> None:
        """Write an object under a key nobody else writes (a fresh stamp and id), durable on return.

        For the label log, whose writes requests wait on. The base version is put_if_absent; the local
        store journals it (one O_DSYNC write, see journal.py).
        """
        self.put_if_absent(key, data)

    def put_json(self, key: str, value: Any) -> None:
        self.put_bytes(key, json.dumps(value, indent=1, sort_keys=True).encode(), "application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        self.put_bytes(key, Path(path).read_bytes(), content_type)

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks, for streaming big objects (checkpoints) without holding them.

        Raises NotFound at the call, not at the first chunk, so a caller can answer 404 before it
        starts a response. The base version reads the whole object; backends override it.
        """
        return iter((self.get_bytes(key),))


class LocalStore(ObjectStore):
    """Objects as files under a root directory; atomic by write-to-temp then rename.

    The root is made once, on the first run, which leaves a marker beside it (in the parent
    directory). A root that is missing later (an unmounted volume, a moved directory) makes the store
    unavailable, also to a process that opens it then: it is never made again, so nothing is written
    to an empty stand-in and acknowledged there, and a missing object is told from a missing store.
    """

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        marker = self.root.with_name(f".{self.root.name}.alpipe-store")
        if not self.root.is_dir():
            if marker.exists():
                raise self._unavailable(FileNotFoundError(f"{self.root} is gone (it was made before: "
                                                          f"{marker} says so)"))
            self.root.mkdir(parents=True, exist_ok=True)
        marker.touch(exist_ok=True)  # a store made before markers existed gets one now
        self._journal_reader = JournalReader(self.root / JOURNAL_DIR)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or ".." in parts or parts[0] == JOURNAL_DIR:
            raise ValueError(f"invalid object key {key!r}")
        return self.root / key

    @contextmanager
    def _io(self, key: str | None = None) -> Iterator[None]:
        """OS errors as StoreUnavailable; FileNotFoundError as NotFound(key) while the root is there."""
        try:
            yield
        except FileNotFoundError as e:
            if key is None or not self.root.is_dir():
                cause = e if self.root.is_dir() else FileNotFoundError(f"{self.root} is gone")
                raise self._unavailable(cause) from None
            raise NotFound(f"object {key!r} not found in {self.describe()}") from None
        except OSError as e:
            raise self._unavailable(e) from None
        self._answered()

    def _require_root(self) -> None:
        """FileNotFoundError (StoreUnavailable under _io) when the root is gone: an unmounted volume is
        never made again empty, listed as empty, or written into."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is gone")

    def _parent(self, key: str) -> Path:
        """The key's directory, made below the root and never the root itself: each level is made on
        the one above, so a root that vanishes meanwhile fails the call instead of coming back empty."""
        path = self._path(key)
        missing = []
        folder = path.parent
        while folder != self.root and not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        self._require_root()
        for folder in reversed(missing):
            folder.mkdir(exist_ok=True)
        return path

    @staticmethod
    def _write_temp(folder: Path, data: bytes) -> str:
        """A complete, fsynced temporary file in folder (removed again if writing it fails)."""
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        with self._io():
            path = self._parent(key)
            tmp = self._write_temp(path.parent, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            fsync_dir(path.parent)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        with self._io():
            path = self._parent(key)
            tmp = self._write_temp(path.parent, data)
            try:
                # link() fails when the target exists: an atomic create-if-absent of a complete file.
                os.link(tmp, path)
                fsync_dir(path.parent)  # the new name survives a power loss too: acknowledged = durable
                return True
            except FileExistsError:
                return False
            finally:
                Path(tmp).unlink(missing_ok=True)

    def put_new(self, key: str, data: bytes) -> None:
        """Journaled: durable after one O_DSYNC write; list() and get_bytes() see it at once, exists()
        once the journal's background thread has made it a file (milliseconds later)."""
        with self._io():
            self._path(key)  # a bad key is refused before anything is journaled
            self._require_root()
            journal = _process_journal(self)
            if journal.fits(key, data):
                journal.append(key, data)
                return
        self.put_if_absent(key, data)

    _FILES_PER_BATCH = 256

    def _put_many_if_absent(self, objects: list[tuple[str, bytes]]) -> None:
        """Write the objects whose keys do not exist yet, durable on return, with one pair of filesystem
        commits per _FILES_PER_BATCH of them: every file's data first, then every name (the journal's batches)."""
        step = self._FILES_PER_BATCH  # a bounded number of open files, however long the backlog
        for start in range(0, len(objects), step):
            self._put_batch_if_absent(objects[start:start + step])

    def _put_batch_if_absent(self, objects: list[tuple[str, bytes]]) -> None:
        with self._io():
            temps: list[tuple[int, str, Path]] = []
            try:
                for key, data in objects:
                    path = self._parent(key)
                    if path.is_file():
                        continue
                    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
                    temps.append((fd, tmp, path))
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                for fd, _tmp, _path in temps:
                    os.fsync(fd)  # the first fsync commits them all; the others find their data written
                folders = set()
                for _fd, tmp, path in temps:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:  # a reader or another batch made it first
                        continue
                    folders.add(path.parent)
                for folder in folders:
                    fsync_dir(folder)
            finally:
                for fd, tmp, _path in temps:
                    os.close(fd)
                    Path(tmp).unlink(missing_ok=True)

    def _settle_journal(self) -> None:
        """Make files of every journaled object, of every process, that is not a file yet."""
        with self._io():
            self._require_root()
            self._journal_reader.settle(self._put_many_if_absent)

    def get_bytes(self, key: str) -> bytes:
        try:
            with self._io(key):
                return self._path(key).read_bytes()
        except NotFound:
            self._settle_journal()  # it may be journaled and not a file yet
            with self._io(key):
                return self._path(key).read_bytes()

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with self._io(key):
            f = self._path(key).open("rb")

        def chunks() -> Iterator[bytes]:
            with f, self._io(key):
                while chunk := f.read(chunk_size):
                    yield chunk

        return chunks()

    def exists(self, key: str) -> bool:
        with self._io():
            self._require_root()
            return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        def fail(e: OSError) -> None:
            raise e  # os.walk ignores errors by default: a store it cannot read would list as empty

        keys = []
        self._settle_journal()
        with self._io():
            self._require_root()
            # Walk only the directories the prefix can be in.
            start = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
            if start.is_dir():
                for dirpath, dirs, files in os.walk(start, onerror=fail):
                    if dirpath == str(self.root) and JOURNAL_DIR in dirs:
                        dirs.remove(JOURNAL_DIR)
                    for name in files:
                        if name.startswith(".tmp-"):
                            continue
                        key = Path(dirpath, name).relative_to(self.root).as_posix()
                        if key.startswith(prefix):
                            keys.append(key)
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        with self._io():
            self._require_root()
            self._path(key).unlink(missing_ok=True)

    def describe(self) -> str:
        return f"local directory {self.root}"


# The local store's write-ahead journal lives inside its root, so it moves with the store's volume.
JOURNAL_DIR = ".journal"

_journals: dict[tuple[int, Path], Journal] = {}
_journals_lock = threading.Lock()


def _process_journal(store: LocalStore) -> Journal:
    """This process's journal of the store's root (one per root: every LocalStore on it shares it)."""
    key = (os.getpid(), store.root)  # a forked child gets a journal of its own
    with _journals_lock:
        journal = _journals.get(key)
        if journal is None:
            journal = _journals[key] = Journal(store.root / JOURNAL_DIR, store._put_many_if_absent)
            atexit.register(_close_journal, journal)
            store._settle_journal()  # what a predecessor killed mid-way left becomes files now, not at a later list
        return journal


def _close_journal(journal: Journal) -> None:
    """At exit: make files of what is journaled and delete the segments (a reader would, later)."""
    try:
        journal.close()
    except Exception as e:
        log.warning("journal %s left for the next reader: %s: %s", journal.folder, e.__class__.__name__, e)


class S3Store(ObjectStore):
    """S3 or MinIO through the minio SDK; creates the bucket when missing."""

    def __init__(self, *, endpoint: str, access_key: str, secret_key: str, bucket: str,
                 secure: bool = False, region: str = "us-east-1"):
        from minio import Minio

        self.bucket = bucket
        self.endpoint = endpoint
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key,
                            secure=secure, region=region)
        if not self.client.bucket_exists(bucket):
            from minio.error import S3Error

            try:
                self.client.make_bucket(bucket)
            except S3Error as e:  # another worker created it between the check and the create
                if e.code != "BucketAlreadyOwnedByYou":
                    raise

    @contextmanager
    def _call(self) -> Iterator[None]:
        """Errors of the server or the connection as StoreUnavailable (callers handle the S3 error codes
        that are answers: a missing key, a failed precondition)."""
        import urllib3
        from minio.error import InvalidResponseError, MinioException

        try:
            yield
        except (MinioException, InvalidResponseError, urllib3.exceptions.HTTPError, OSError) as e:
            raise self._unavailable(e) from None
        self._answered()

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        with self._call():
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    # A single PutObject carries at most 5 GiB; larger objects fall back to check-then-put.
    _MAX_SINGLE_PUT = 5 * 1024**3

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """S3 conditional write (PUT with If-None-Match: *): atomic create-if-absent on the server.

        minio's public put_object() turns unknown headers into x-amz-meta-* user metadata, so the
        request goes through the client's single-part PUT (Minio._put_object, minio==7.2.20).
        """
        import time

        from minio.error import S3Error
        from minio.helpers import check_object_name

        if len(data) > self._MAX_SINGLE_PUT:
            return super().put_if_absent(key, data)
        check_object_name(key)
        headers = {"Content-Type": "application/octet-stream", "If-None-Match": "*"}
        with self._call():
            for attempt in range(5):
                try:
                    self.client._put_object(self.bucket, key, data, headers=dict(headers))
                    return True
                except S3Error as e:
                    if e.code == "PreconditionFailed":  # the key exists
                        return False
                    # S3 answers 409 ConditionalRequestConflict while a concurrent conditional write
                    # of the same key is in flight: retry, the next try sees that write's outcome.
                    if e.code != "ConditionalRequestConflict" or attempt == 4:
                        raise
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def _open(self, key: str):
        """The GET response of key; NotFound when it does not exist. The caller closes it."""
        from minio.error import S3Error

        with self._call():
            try:
                return self.client.get_object(self.bucket, key)
            except S3Error as e:
                if e.code in ("NoSuchKey", "NoSuchObject"):
                    raise NotFound(f"object {key!r} not found in {self.describe()}") from None
                raise

    def get_bytes(self, key: str) -> bytes:
        response = self._open(key)
        try:
            with self._call():
                return response.read()
        finally:
            response.close()
            response.release_conn()

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        response = self._open(key)  # opened here, so a missing key raises at the call, not mid-stream

        def chunks() -> Iterator[bytes]:
            try:
                with self._call():
                    yield from response.stream(chunk_size)
            finally:
                response.close()
                response.release_conn()

        return chunks()

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        with self._call():
            try:
                self.client.stat_object(self.bucket, key)
                return True
            except S3Error as e:
                if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    return False
                raise

    def list(self, prefix: str = "") -> Iterator[str]:
        # Read to the end before yielding: a listing cut by an outage is an error, never a shorter list.
        with self._call():
            keys = [obj.object_name for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]
        yield from keys

    def delete(self, key: str) -> None:
        with self._call():
            self.client.remove_object(self.bucket, key)

    def describe(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint}"


def open_store(settings: Settings) -> ObjectStore:
    """The store the settings name: S3 when an endpoint is set, else the local directory."""
    if settings.s3_endpoint:
        return S3Store(endpoint=settings.s3_endpoint, access_key=settings.s3_access_key,
                       secret_key=settings.s3_secret_key, bucket=settings.s3_bucket,
                       secure=settings.s3_secure, region=settings.s3_region)
    return LocalStore(settings.data_dir / "store")
