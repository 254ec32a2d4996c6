"""HTTP routes: parse the request, call one core function of alpipe.projects, format the answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.convertors import StringConvertor, register_url_convertor

from alpipe import access, projects
from alpipe.projects import NotAnImage, TooLarge
from alpipe.schemas import (
    CurvePointOut,
    ImportRequest,
    ImportResult,
    LabelBatch,
    LabelResult,
    LeaseRelease,
    LeaseReleaseResult,
    Me,
    ProjectCreate,
    ProjectPublic,
    ProjectSummary,
    QueryOut,
    TrainRequestResult,
    UndoResult,
    UploadResult,
)

from .bodies import read_form_file
from .deps import MetricsDep, PrincipalDep, ProjectDep, RedisDep, SettingsDep, StoreDep, require_admin

router = APIRouter()


class Sha256Convertor(StringConvertor):
    regex = "[0-9a-f]{64}"

@router.get("/health", tags=["service"])
async def health(request: Request, response: Response) -> dict[str, Any]:
    """`ok` when Redis and object storage both answer; 503 naming the part that does not."""
    out = await request.app.state.health.check()
    if out["status"] != "ok":
        response.status_code = 503
    return out


@router.get("/metrics", tags=["service"], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --- who am I -----------------------------------------------------------------------------------------


@router.get("/me", tags=["service"])
def me(principal: PrincipalDep) -> Me:
    """Who the token belongs to and what it may do (auth: false when the API runs without tokens)."""
    return Me(name=principal.name, is_admin=principal.is_admin, projects=list(principal.projects),
              auth=principal.auth)


_ADMIN = [Depends(require_admin)]
_FORBIDDEN = {403: {"description": "the token may not do this (admin only, or a project not granted to it)"}}


# --- projects ----------------------------------------------------------------------------------------


@router.post("/projects", status_code=201, tags=["projects"], dependencies=_ADMIN,
             responses={**_FORBIDDEN, 409: {"description": "a project of that name exists"}})
def create_project(body: ProjectCreate, r: RedisDep, store: StoreDep) -> ProjectPublic:
    """Create a project; 409 when the name is taken, 422 for an unknown strategy, model or repeated class."""
    project = projects.create_project(body, store=store, r=r)
    return projects.describe_project(project, r=r)


@router.get("/projects", tags=["projects"])
def list_projects(r: RedisDep, principal: PrincipalDep) -> list[ProjectSummary]:
    """The projects the caller may access."""
    return [p for p in projects.list_projects(r=r) if principal.can_access(p.name)]


@router.get("/projects/{name}", tags=["projects"], responses=_FORBIDDEN)
def get_project(project: ProjectDep, r: RedisDep) -> ProjectPublic:
    """Counts, current model and its accuracy, the live ranking version, queue depths, curve and config;
    the label policy, votes per labeler, and the samples whose labelers disagree."""
    return projects.describe_project(project, r=r)


# --- samples -----------------------------------------------------------------------------------------


@dataclass
class _Upload:
    data: bytes
    filename: str | None
    label: str | None
    split: str


async def _read_upload(request: Request, *, max_bytes: int) -> _Upload:
    """Parse the multipart body while counting bytes: never more than max_bytes (+ framing) is read."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise NotAnImage("send the image as multipart/form-data in the field 'file'")
    too_large = TooLarge(f"upload larger than the limit of {max_bytes} bytes (ALPIPE_MAX_UPLOAD_BYTES)")
    form = await read_form_file(request, max_bytes=max_bytes, too_large=too_large, what="the image")
    return _Upload(data=form.data, filename=form.filename, label=form.fields.get("label"),
                   split=form.fields.get("split", "pool"))


_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "the image (any format PIL decodes)"},
        "label": {"type": "string", "description": "known label: required for split=test; for a pool "
                                                   "sample it is kept as ground truth, never shown to training"},
        "split": {"type": "string", "enum": ["pool", "test"], "default": "pool"},
    }}}}}}


@router.post("/projects/{name}/samples", status_code=201, tags=["samples"], openapi_extra=_UPLOAD_BODY,
             dependencies=_ADMIN,
             responses={**_FORBIDDEN, 200: {"description": "the project already had this image", "model": UploadResult},
                        413: {"description": "larger than ALPIPE_MAX_UPLOAD_BYTES"},
                        415: {"description": "not an image"}})
async def upload_sample(request: Request, response: Response, project: ProjectDep, r: RedisDep,
                        store: StoreDep, settings: SettingsDep, metrics: MetricsDep) -> UploadResult:
    """Upload one image (multipart field `file`); re-uploading the same bytes is a no-op."""
    upload = await _read_upload(request, max_bytes=settings.max_upload_bytes)
    result = await run_in_threadpool(projects.add_upload, project, upload.data, filename=upload.filename,
                                     label=upload.label, split=upload.split, store=store, r=r,
                                     settings=settings)
    if result.created:
        metrics.samples_added.labels(project.name, result.split).inc()
    else:
        response.status_code = 200
    return result


@router.post("/projects/{name}/samples/import", tags=["samples"], dependencies=_ADMIN, responses=_FORBIDDEN)
def import_samples(body: ImportRequest, project: ProjectDep, r: RedisDep, store: StoreDep,
                   settings: SettingsDep, metrics: MetricsDep) -> ImportResult:
    """Import a built-in dataset (mnist5k, digits, photos) or an ImageFolder on the server, with a test split.

    In embedding mode this also queues the embedding pass over the new images."""
    result = projects.import_dataset(project, body, store=store, r=r, settings=settings)
    metrics.samples_added.labels(project.name, "pool").inc(result.pool)
    metrics.samples_added.labels(project.name, "test").inc(result.test)
    return result


_TOKEN_QUERY = Query(description="the bearer token, for clients that cannot send headers (<img src>)")


@router.get("/projects/{name}/samples/{sample_id}/image", tags=["samples"], response_class=Response,
            responses={200: {"content": {"image/*": {}}, "description": "the image bytes"}, **_FORBIDDEN})
def sample_image(sample_id: str, project: ProjectDep, r: RedisDep, store: StoreDep,
                 token: Annotated[str | None, _TOKEN_QUERY] = None) -> Response:
    """The image bytes of a sample (authenticated by header, or by `?token=`)."""
    del token  # read by the authentication dependency
    data, mime = projects.sample_image(project, sample_id, store=store, r=r)
    # Content-addressed: the bytes behind an id never change.
    return Response(data, media_type=mime, headers={"Cache-Control": "public, max-age=31536000, immutable",
                                                     "ETag": f'"{sample_id}"'})


# --- queries and labels ------------------------------------------------------------------------------


_LABELER_QUERY = Query(min_length=1, max_length=200, description="you: with auth on, your token's labeler (may "
                                                                  "be left out); with auth off, any name "
                                                                  "(default 'anonymous')")


@router.get("/projects/{name}/queries", tags=["labeling"], responses=_FORBIDDEN)
def get_queries(project: ProjectDep, r: RedisDep, settings: SettingsDep, metrics: MetricsDep,
                principal: PrincipalDep,
                n: Annotated[int, Query(ge=1, le=1000, description="how many samples")] = 10,
                labeler: Annotated[str | None, _LABELER_QUERY] = None) -> QueryOut:
    """The n most informative unlabeled samples of the live ranking, leased to you for lease_ttl_s,
    each with the model's guess of its class."""
    who = access.labeler_name(principal, labeler)
    out = projects.lease_queries(project, n=n, labeler=who, ttl_s=settings.lease_ttl_s, r=r)
    metrics.queries_served.labels(project.name).inc()
    metrics.samples_leased.labels(project.name).inc(len(out.samples))
    return out


@router.post("/projects/{name}/leases/release", tags=["labeling"], responses=_FORBIDDEN)
def post_lease_release(body: LeaseRelease, project: ProjectDep, r: RedisDep, metrics: MetricsDep,
                       principal: PrincipalDep) -> LeaseReleaseResult:
    """Hand samples you were served back unlabeled, so other labelers get them now instead of after
    lease_ttl_s. The labeling page calls this when it is closed. Safe to repeat."""
    body = body.model_copy(update={"labeler": access.labeler_name(principal, body.labeler)})
    result = projects.release_leases(project, body, r=r)
    metrics.samples_released.labels(project.name).inc(result.released)
    return result


@router.post("/projects/{name}/labels", tags=["labeling"],
             responses={**_FORBIDDEN, 404: {"description": "unknown project"},
                        409: {"description": "a sample is leased to someone else"},
                        422: {"description": "a sample the project does not have (or in its test split), or a "
                                             "label that is not a class"}})
def post_labels(body: LabelBatch, project: ProjectDep, r: RedisDep, store: StoreDep, settings: SettingsDep,
                metrics: MetricsDep, principal: PrincipalDep) -> LabelResult:
    """Record your labels (one vote per labeler and sample): all or nothing, durable in the label log
    before the answer; repeats are no-ops, a different label replaces your vote."""
    body = body.model_copy(update={"labeler": access.labeler_name(principal, body.labeler)})
    result = projects.submit_labels(project, body, store=store, r=r, settings=settings)
    metrics.labels_accepted.labels(project.name).inc(result.accepted)
    metrics.label_duplicates.labels(project.name).inc(result.duplicates)
    return result


# A sample id is the sha256 of its bytes: the path admits nothing else, so .../labels/import is the
# label-import route's alone.
register_url_convertor("sha256", Sha256Convertor())


@router.delete("/projects/{name}/labels/{sample_id:sha256}", tags=["labeling"],
               responses={**_FORBIDDEN, 404: {"description": "unknown project or sample, or you have no label on it"}})
def delete_label(sample_id: str, project: ProjectDep, r: RedisDep, store: StoreDep, settings: SettingsDep,
                 metrics: MetricsDep, principal: PrincipalDep,
                 labeler: Annotated[str | None, _LABELER_QUERY] = None) -> UndoResult:
    """Undo your label on a sample: durable in the label log first, then the training label follows the
    votes left. Left without votes, the sample goes back to the pool, leased to you under lease_token."""
    who = access.labeler_name(principal, labeler)
    result = projects.retract_label(project, sample_id, labeler=who, store=store, r=r,
                                    lease_ttl_s=settings.lease_ttl_s)
    metrics.labels_retracted.labels(project.name).inc()
    return result


@router.post("/projects/{name}/train", status_code=202, tags=["labeling"], dependencies=_ADMIN,
             responses=_FORBIDDEN)
def post_train(project: ProjectDep, r: RedisDep, settings: SettingsDep) -> TrainRequestResult:
    """Retrain now on labels the current model has not seen, even fewer than query_size of them.

    job_id is null when there is nothing new, or when a train job is already queued or running
    (it will see these labels; ask again once it is done if it was started before they arrived).
    """
    return projects.request_training(r, project, settings=settings)


# --- learning curve ---------------------------------------------------------------------------------


@router.get("/projects/{name}/curve", tags=["curve"], response_model=list[CurvePointOut])
def get_curve(project: ProjectDep, r: RedisDep) -> list[dict]:
    """Test accuracy vs number of labels, one point per model version."""
    return projects.curve_points(project, r=r)


@router.get("/projects/{name}/curve.png", tags=["curve"], response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the learning curve plot"}, **_FORBIDDEN})
def get_curve_png(project: ProjectDep, r: RedisDep, token: Annotated[str | None, _TOKEN_QUERY] = None) -> Response:
    """The learning curve plot (authenticated by header, or by `?token=`)."""
    del token  # read by the authentication dependency
    png = projects.curve_png(project, projects.curve_points(project, r=r))
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})
