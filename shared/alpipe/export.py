"""Getting labels and models out of a project, and labels in from a CSV (warm start).

Exports read the durable label log (object storage) in write order, plus what the trainer trains
on now: the project's current labels in Redis (`training_labels`). They are generators of byte
chunks, so the API streams a project of any size without building the file in memory.

- csv: one row per label-log record: `sample_id,name,label,labeler,labeled_at,labeled_at_epoch,retracted`
  (`labeled_at` ISO 8601 UTC; `retracted` is true on a record that withdraws the labeler's earlier
  label of the sample, an undo).
- json: `{"project", "classes", "exported_at", "records": [...], "training_labels": {sample_id: label}}`.
- imagefolder: a ZIP of `<class>/<sample_id>.<ext>` for every sample's training label, plus a
  `labels.csv` manifest (`path,sample_id,name,label`).

Pure functions over their collaborators (store, Redis, settings), like alpipe.projects. No torch:
the slim API image serves these.
"""

from __future__ import annotations

import csv
import io
import json
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Literal

import redis
from pydantic import Field

from . import records
from .config import Settings
from .errors import NotFound
from .projects import Conflict, Invalid, submit_labels
from .schemas import LabelBatch, LabelIn, LabelRecord, LabelResult, Project, class_index
from .state import ProjectState
from .storage import ObjectStore

ExportFormat = Literal["csv", "json", "imagefolder"]
FORMATS: tuple[str, ...] = ("csv", "json", "imagefolder")

CSV_COLUMNS = ("sample_id", "name", "label", "labeler", "labeled_at", "labeled_at_epoch", "retracted")
MANIFEST_COLUMNS = ("path", "sample_id", "name", "label")

# Stream in pieces of about this size: big enough that per-chunk overhead does not matter.
_CHUNK_BYTES = 64 * 1024
# LabelBatch takes at most this many labels; a big import goes in several batches.
_MAX_BATCH = 10_000
# Bad rows named in a 422 answer.
_SHOW_BAD_ROWS = 5
# As LabelBatch.labeler allows.
_MAX_LABELER = 200


@dataclass(frozen=True)
class ExportMeta:
    media_type: str
    filename: str


def export_meta(project: str, fmt: str) -> ExportMeta:
    """Content type and attachment filename of an export."""
    return {
        "csv": ExportMeta("text/csv; charset=utf-8", f"{project}-labels.csv"),
        "json": ExportMeta("application/json", f"{project}-labels.json"),
        "imagefolder": ExportMeta("application/zip", f"{project}-labels.zip"),
    }[fmt]


def iso_utc(epoch: float) -> str:
    """ISO 8601 in UTC with millisecond precision, e.g. 2026-05-09T07:35:25.123Z."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_retraction(record: LabelRecord) -> bool:
    """True for a record that withdraws a label (label logs written before undo existed have none)."""
    return bool(getattr(record, "retract", False))


def sample_names(store: ObjectStore, project: str, wanted: set[str] | None = None) -> dict[str, str]:
    """sample_id -> original name (e.g. '3/00012.png' of an ImageFolder import), for wanted ids or all."""
    names: dict[str, str] = {}
    for _key, batch in records.read_sample_batches(store, project):
        for rec in batch:
            if wanted is None or rec.id in wanted:
                names.setdefault(rec.id, rec.name)
    return names


@dataclass
class _Snapshot:
    """What one export reads: the training labels, then the label-log keys.

    Redis first: a label is in the log before it is in Redis, so every training label's record
    is in the log keys listed after it.
    """

    training_labels: dict[str, str]
    log_keys: list[str]
    names: dict[str, str]


def _snapshot(project: Project, *, store: ObjectStore, r: redis.Redis, with_log: bool) -> _Snapshot:
    training = ProjectState(r, project.name).labels()
    log_keys = records.label_log_keys(store, project.name) if with_log else []
    # The log may name any sample; the ZIP only the labeled ones.
    names = sample_names(store, project.name, None if with_log else set(training))
    return _Snapshot(training, log_keys, names)


def _records(store: ObjectStore, log_keys: list[str]) -> Iterator[LabelRecord]:
    for key in log_keys:
        yield from records.read_label_batch(store, key)


def _record_dict(rec: LabelRecord, names: dict[str, str]) -> dict:
    return {"sample_id": rec.sample_id, "name": names.get(rec.sample_id), "label": rec.label,
            "labeler": rec.labeler, "labeled_at": iso_utc(rec.at), "labeled_at_epoch": rec.at,
            "retracted": is_retraction(rec), "batch": rec.batch}


def _sorted_training(project: Project, training: dict[str, str]) -> list[tuple[str, str]]:
    """(sample_id, label) by class order, then sample id: a stable order for the ZIP."""
    rank = class_index(project.classes)
    return sorted(training.items(), key=lambda kv: (rank.get(kv[1], len(rank)), kv[1], kv[0]))


class _Buffer:
    """A write-only file that keeps what is written until drained: lets a writer feed a generator."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes | str) -> int:
        if isinstance(data, str):
            data = data.encode()
        if data:
            self._parts.append(bytes(data))
            self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        self.size = 0
        return out


def _csv_line(row: Iterable[object]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(row)
    return buf.getvalue()


def export_csv(project: Project, *, store: ObjectStore, r: redis.Redis) -> Iterator[bytes]:
    """One row per label-log record, in write order; a header-only file when there are none."""
    snap = _snapshot(project, store=store, r=r, with_log=True)

    def rows() -> Iterator[bytes]:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for rec in _records(store, snap.log_keys):
            writer.writerow([rec.sample_id, snap.names.get(rec.sample_id, ""), rec.label, rec.labeler,
                             iso_utc(rec.at), repr(rec.at), "true" if is_retraction(rec) else "false"])
            if out.tell() >= _CHUNK_BYTES:
                yield out.getvalue().encode()
                out.seek(0)
                out.truncate()
        yield out.getvalue().encode()

    return rows()


def export_json(project: Project, *, store: ObjectStore, r: redis.Redis,
                now: float | None = None) -> Iterator[bytes]:
    """The records and the training labels as one JSON document, written piece by piece."""
    snap = _snapshot(project, store=store, r=r, with_log=True)
    exported_at = iso_utc(time.time() if now is None else now)

    def pieces() -> Iterator[bytes]:
        head = {"project": project.name, "classes": project.classes, "exported_at": exported_at}
        buf = json.dumps(head)[:-1] + ', "records": ['
        first = True
        for rec in _records(store, snap.log_keys):
            buf += ("" if first else ", ") + json.dumps(_record_dict(rec, snap.names))
            first = False
            if len(buf) >= _CHUNK_BYTES:
                yield buf.encode()
                buf = ""
        buf += '], "training_labels": ' + json.dumps(snap.training_labels, sort_keys=True) + "}\n"
        yield buf.encode()

    return pieces()


_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif"}


def image_extension(data: bytes, name: str | None = None) -> str:
    """File extension for image bytes: from the format in the header, else from the original name."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            fmt = img.format or ""
    except Exception:
        fmt = ""
    if fmt:
        return _EXTENSIONS.get(fmt, fmt.lower())
    suffix = PurePosixPath(name or "").suffix.lstrip(".").lower()
    return suffix if suffix.isalnum() else "bin"


def safe_folder(label: str) -> str:
    """A class name as one ZIP path component: no separators, no '.'/'..', no control characters."""
    cleaned = "".join("_" if ch in '/\\:' or ord(ch) < 32 else ch for ch in label).strip()
    if cleaned in ("", ".", ".."):
        return cleaned.replace(".", "_") or "_"
    return cleaned


def export_imagefolder(project: Project, *, store: ObjectStore, r: redis.Redis) -> Iterator[bytes]:
    """A ZIP `<class>/<sample_id>.<ext>` of every labeled sample plus labels.csv, streamed entry by entry.

    zipfile writes to an unseekable buffer (sizes go in data descriptors and the central
    directory), which is drained after every entry: memory holds one image at a time.
    """
    snap = _snapshot(project, store=store, r=r, with_log=False)

    def entries() -> Iterator[bytes]:
        stamp = time.gmtime()[:6]
        sink = _Buffer()
        manifest = [_csv_line(MANIFEST_COLUMNS)]
        with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for sample_id, label in _sorted_training(project, snap.training_labels):
                data = records.read_image(store, sample_id)
                name = snap.names.get(sample_id, "")
                path = f"{safe_folder(label)}/{sample_id}.{image_extension(data, name)}"
                # Images are compressed already: store them as they are.
                zf.writestr(_entry(path, stamp), data, compress_type=zipfile.ZIP_STORED)
                manifest.append(_csv_line([path, sample_id, name, label]))
                yield sink.drain()
            zf.writestr(_entry("labels.csv", stamp), "".join(manifest).encode(), compress_type=zipfile.ZIP_DEFLATED)
        yield sink.drain()

    return entries()


def _entry(path: str, stamp: tuple) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(path, date_time=stamp)
    info.external_attr = 0o644 << 16
    return info


EXPORTERS: dict[str, Callable[..., Iterator[bytes]]] = {
    "csv": export_csv, "json": export_json, "imagefolder": export_imagefolder,
}


def export_labels(project: Project, fmt: str, *, store: ObjectStore, r: redis.Redis) -> Iterator[bytes]:
    """The export of `fmt` as byte chunks; reads what it needs before returning (errors come early)."""
    try:
        exporter = EXPORTERS[fmt]
    except KeyError:
        raise Invalid(f"unknown export format {fmt!r}; choose from: {', '.join(FORMATS)}") from None
    return exporter(project, store=store, r=r)


# --- model download ----------------------------------------------------------------------------------


@dataclass
class ModelDownload:
    version: int
    filename: str
    chunks: Iterator[bytes]


def model_download(project: Project, version: int | None, *, store: ObjectStore) -> ModelDownload:
    """The bytes of checkpoint `version` (default: the current one), streamed from object storage.

    Reads the pointer object, not torch: only versions at or below the pointer are models (a
    checkpoint above it is a training that never finished).
    """
    name = project.name
    pointer = records.read_pointer(store, name)
    if pointer is None:
        raise NotFound(f"project {name!r} has no model yet: the trainer writes version 1 once "
                       f"{project.query_size} labels are in (or POST /projects/{name}/train asks for one now)")
    current = pointer.version
    wanted = current if version is None else version
    if wanted > current or wanted < 1:
        raise NotFound(f"project {name!r} has no model version {wanted}; the current version is {current}")
    try:
        chunks = records.checkpoint_chunks(store, name, wanted, pointer)
    except NotFound:
        raise NotFound(f"model version {wanted} of project {name!r} is not in object storage "
                       f"(the current version is {current})") from None
    return ModelDownload(version=wanted, filename=f"{name}-v{wanted}.pt", chunks=chunks)


# --- import labels from CSV --------------------------------------------------------------------------


class LabelImportResult(LabelResult):
    rows: int = Field(description="data rows read from the CSV")
    superseded: int = Field(0, description="rows replaced by a later row of the same labeler and sample, "
                                           "or withdrawn by a retracted row: not sent")


@dataclass
class _Row:
    line: int
    key: str  # sample id, or name when by_name
    by_name: bool
    label: str
    labeler: str
    retract: bool
    sample_id: str | None = None


_TRUE = {"1", "true", "yes", "y", "t"}


def _read_rows(text: str, *, default_labeler: str) -> list[_Row]:
    """Rows of a label CSV; Invalid naming what the header must be when it is not usable."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise Invalid("the CSV is empty; expected a header sample_id,label[,labeler] or name,label[,labeler] "
                      "and one row per label") from None
    except csv.Error as e:
        raise Invalid(f"line 1: not valid CSV ({e})") from None
    columns = [h.strip().lower() for h in header]
    index = {c: i for i, c in reversed(list(enumerate(columns)))}
    if "label" not in index or not ({"sample_id", "name"} & index.keys()):
        raise Invalid(f"line 1: the header must be sample_id,label[,labeler] or name,label[,labeler]; "
                      f"got {','.join(header)!r}")
    rows: list[_Row] = []

    def cell(values: list[str], column: str) -> str:
        i = index.get(column)
        return values[i].strip() if i is not None and i < len(values) else ""

    try:
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # blank line
            sample_id, name = cell(values, "sample_id"), cell(values, "name")
            rows.append(_Row(line=reader.line_num, key=sample_id or name, by_name=not sample_id,
                             label=cell(values, "label"), labeler=cell(values, "labeler") or default_labeler,
                             retract=cell(values, "retracted").lower() in _TRUE))
    except csv.Error as e:
        raise Invalid(f"line {reader.line_num}: not valid CSV ({e})") from None
    return rows


def _names_to_ids(store: ObjectStore, project: str, wanted: set[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    if not wanted:
        return found
    for _key, batch in records.read_sample_batches(store, project):
        for rec in batch:
            if rec.name in wanted and rec.id not in found.setdefault(rec.name, []):
                found[rec.name].append(rec.id)
    return found


def _bad_rows(problems: list[tuple[int, str]], what: str) -> str:
    problems.sort()
    shown = "; ".join(f"line {line}: {msg}" for line, msg in problems[:_SHOW_BAD_ROWS])
    more = f"; and {len(problems) - _SHOW_BAD_ROWS} more" if len(problems) > _SHOW_BAD_ROWS else ""
    plural = "s" if len(problems) != 1 else ""
    return f"{len(problems)} {what}{plural}, nothing was imported: {shown}{more}"


def import_labels_csv(project: Project, text: str, *, store: ObjectStore, r: redis.Redis, settings: Settings,
                      default_labeler: str = "import", now: float | None = None) -> LabelImportResult:
    """Validate every row, then label through submit_labels, one batch per labeler (and 10,000 labels).

    Rows name a sample by `sample_id`, or by `name` (its original name, e.g. '3/00012.png' of an
    ImageFolder import). All or nothing on validation: an unknown sample, a name that matches
    several samples, a test sample or a label that is not a class rejects the whole file (Invalid,
    the first bad rows by line number); a sample leased to a labeler rejects it too (Conflict),
    as for posted labels without the lease token. Per labeler and sample the last row wins, and a
    row with `retracted` true withdraws that labeler's earlier row, as in the label log, so an
    exported CSV imports as the labels it ends with. Re-importing a file is a no-op (duplicates).
    """
    rows = _read_rows(text, default_labeler=default_labeler)
    if not rows:
        raise Invalid("the CSV has a header but no rows; nothing to import")
    state = ProjectState(r, project.name)
    problems: list[tuple[int, str]] = []

    ids_by_name = _names_to_ids(store, project.name, {row.key for row in rows if row.by_name and row.key})
    for row in rows:
        if len(row.labeler) > _MAX_LABELER:
            problems.append((row.line, f"labeler name longer than {_MAX_LABELER} characters"))
        if not row.key:
            problems.append((row.line, "no sample_id or name"))
        elif row.by_name:
            matches = ids_by_name.get(row.key, [])
            if len(matches) == 1:
                row.sample_id = matches[0]
            elif not matches:
                problems.append((row.line, f"no sample named {row.key!r} in project {project.name!r}"))
            else:
                problems.append((row.line, f"name {row.key!r} matches {len(matches)} samples; use sample_id"))
        else:
            row.sample_id = row.key
    known = [row for row in rows if row.sample_id is not None]
    splits: list[str | None] = []
    for start in range(0, len(known), _MAX_BATCH):
        splits.extend(state.sample_splits([row.sample_id for row in known[start:start + _MAX_BATCH]]))
    classes = set(project.classes)
    for row, split in zip(known, splits, strict=True):
        if split is None:
            problems.append((row.line, f"sample {row.sample_id!r} not found in project {project.name!r}"))
        elif split == "test":
            problems.append((row.line, f"sample {row.sample_id!r} is in the test split (its label is known)"))
        elif not row.retract and row.label not in classes:
            problems.append((row.line, f"label {row.label!r} is not a class (allowed: {', '.join(project.classes)})"))
    if problems:
        raise Invalid(_bad_rows(problems, "bad row"))

    # Replay per labeler in file order: the last row wins, a retracted row withdraws the earlier one.
    final: dict[str, dict[str, _Row]] = {}
    for row in rows:
        mine = final.setdefault(row.labeler, {})
        mine.pop(row.sample_id, None)  # re-insert: dict order follows the latest row
        if not row.retract:
            mine[row.sample_id] = row
    chosen = [row for mine in final.values() for row in mine.values()]
    superseded = len(rows) - len(chosen)

    ids = list(dict.fromkeys(row.sample_id for row in chosen))
    leased: set[str] = set()
    for start in range(0, len(ids), _MAX_BATCH):
        part = ids[start:start + _MAX_BATCH]
        leased.update(sid for sid, holder in zip(part, state.lease_holders(part, now=now), strict=True) if holder)
    if leased:
        holders = [(row.line, f"sample {row.sample_id!r} is leased to a labeler") for row in chosen
                   if row.sample_id in leased]
        raise Conflict(_bad_rows(holders, "row on a leased sample") +
                       " (label it through the queries that leased it, or import once the lease expires)")

    total = LabelImportResult(accepted=0, duplicates=0, labeled=state.counts()["labeled"], rows=len(rows),
                              superseded=superseded)
    for labeler, mine in final.items():
        items = [LabelIn(sample_id=row.sample_id, label=row.label) for row in mine.values()]
        for start in range(0, len(items), _MAX_BATCH):
            result = submit_labels(project, LabelBatch(labels=items[start:start + _MAX_BATCH], labeler=labeler),
                                   store=store, r=r, settings=settings, now=now)
            total.accepted += result.accepted
            total.duplicates += result.duplicates
            total.labeled = result.labeled
    return total
