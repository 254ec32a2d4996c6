"""Routes that move labels and models in and out of a project: export, CSV import, model download.

Thin: parse the request, call one function of alpipe.export, stream or format the answer.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from alpipe import export
from alpipe.export import ExportFormat, LabelImportResult
from alpipe.projects import Invalid, TooLarge

from .bodies import capped_stream, check_declared_length, read_form_file
from .deps import MetricsDep, ProjectDep, RedisDep, SettingsDep, StoreDep, require_admin

router = APIRouter()

# Admin only: an export hands out every label and image, a model all that was learnt, an import labels
# in other people's names.
_ADMIN = [Depends(require_admin)]
_FORBIDDEN = {403: {"description": "admin only"}}

def _attachment(filename: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"}


@router.get("/projects/{name}/export", tags=["export"], response_class=StreamingResponse, dependencies=_ADMIN,
            responses={**_FORBIDDEN, 200: {"description": "the export as an attachment, streamed",
                             "content": {"text/csv": {}, "application/json": {}, "application/zip": {}}},
                        422: {"description": "unknown format"}})
def export_labels(project: ProjectDep, r: RedisDep, store: StoreDep,
                  fmt: Annotated[ExportFormat, Query(alias="format", description=(
                      "csv: one row per label-log record; json: the records plus the training label of "
                      "every sample; imagefolder: a ZIP <class>/<sample_id>.<ext> with labels.csv"))] = "csv",
                  ) -> StreamingResponse:
    """Every label-log record in order (csv, json), or the labeled images by class (imagefolder)."""
    chunks = export.export_labels(project, fmt, store=store, r=r)
    meta = export.export_meta(project.name, fmt)
    return StreamingResponse(chunks, media_type=meta.media_type, headers=_attachment(meta.filename))


@router.get("/projects/{name}/model", tags=["export"], response_class=StreamingResponse, dependencies=_ADMIN,
            responses={**_FORBIDDEN, 200: {"description": "the checkpoint (torch.save of a plain dict), streamed",
                             "content": {"application/octet-stream": {}}},
                        404: {"description": "no model yet, or no such version"}})
def download_model(project: ProjectDep, store: StoreDep,
                   version: Annotated[int | None, Query(ge=1, description="a model version; default: the "
                                                                          "current one")] = None,
                   ) -> StreamingResponse:
    """The current model's checkpoint bytes (or an older version's), as `<project>-v<N>.pt`."""
    download = export.model_download(project, version, store=store)
    headers = {**_attachment(download.filename), "X-Model-Version": str(download.version)}
    return StreamingResponse(download.chunks, media_type="application/octet-stream", headers=headers)


async def _read_csv(request: Request, *, max_bytes: int) -> str:
    """The CSV text: the multipart field `file`, or the whole body (text/csv); never more than max_bytes."""
    too_large = TooLarge(f"CSV larger than the limit of {max_bytes} bytes (ALPIPE_MAX_UPLOAD_BYTES)")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        data = (await read_form_file(request, max_bytes=max_bytes, too_large=too_large, what="the CSV")).data
    else:
        check_declared_length(request, max_bytes, too_large)
        data = b"".join([chunk async for chunk in capped_stream(request, max_bytes, too_large)])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Invalid(f"the CSV is not UTF-8 text ({e})") from None


_IMPORT_BODY = {"requestBody": {"required": True, "content": {
    "text/csv": {"schema": {"type": "string"}, "example": "sample_id,label,labeler\n<sha256>,cat,ann\n"},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "the CSV file"}}}},
}}}


@router.post("/projects/{name}/labels/import", tags=["labeling"], openapi_extra=_IMPORT_BODY, dependencies=_ADMIN,
             responses={**_FORBIDDEN, 409: {"description": "a sample is leased to a labeler"},
                        413: {"description": "larger than ALPIPE_MAX_UPLOAD_BYTES"},
                        422: {"description": "bad header or bad rows (the first ones by line number)"}})
async def import_labels(request: Request, project: ProjectDep, r: RedisDep, store: StoreDep, settings: SettingsDep,
                        metrics: MetricsDep,
                        labeler: Annotated[str, Query(min_length=1, max_length=200, description=(
                            "labeler of rows without a labeler column"))] = "import") -> LabelImportResult:
    """Warm-start from a CSV `sample_id,label[,labeler]` or `name,label[,labeler]`: all rows are checked
    before anything is written, then they go in like POST /labels (durable, and they trigger training)."""
    text = await _read_csv(request, max_bytes=settings.max_upload_bytes)
    result = await run_in_threadpool(export.import_labels_csv, project, text, store=store, r=r, settings=settings,
                                     default_labeler=labeler)
    metrics.labels_accepted.labels(project.name).inc(result.accepted)
    metrics.label_duplicates.labels(project.name).inc(result.duplicates)
    return result
