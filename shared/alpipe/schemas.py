"""Pydantic models for everything that crosses a process boundary (files, queues, HTTP)."""

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .model_specs import AUTO, MODEL_NAMES
from .strategies import STRATEGIES
from .train_config import TrainOptions  # a project's `training`: stated once there, for the CLI and trainer too

Split = Literal["pool", "test"]
LabelPolicy = Literal["latest", "majority"]


class SampleRecord(BaseModel):
    """One image: content-addressed id, where it came from, and its known label if any."""

    id: str = Field(description="sha256 of the image bytes")
    name: str = Field(description="where the image came from, e.g. '<class>/<file>' in an ImageFolder")
    label: str | None = Field(None, description="known label (ground truth for the simulated oracle)")
    split: Split = "pool"


class DatasetManifest(BaseModel):
    """A materialized dataset in object storage: images under images/<id>, this under datasets/<name>/."""

    name: str
    classes: list[str]
    channels: Literal[1, 3] = Field(description="1 when every image is grayscale, else 3")
    samples: list[SampleRecord]
    skipped: list[str] = Field(default_factory=list, description="files that were not usable images, with why")


def class_index(classes: list[str]) -> dict[str, int]:
    """Class name -> the model's output index: the order of the project's (or dataset's) class list."""
    return {c: i for i, c in enumerate(classes)}


# --- projects and the wire contract of the services -------------------------------------------

PROJECT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
Slug = Annotated[str, StringConstraints(pattern=PROJECT_NAME_PATTERN)]


def is_project_name(name: str) -> bool:
    """Could a project have this name? (Checked before an object key is built from a request's text.)"""
    return re.fullmatch(PROJECT_NAME_PATTERN, name) is not None

# A class name: printable (no control characters), not blank. The document states it as a pattern; the
# API checks it in projects.validate_project, whose messages say what is wrong in words.
_PRINTABLE = r"[^\x00-\x1f\x7f-\x9f]"
CLASS_NAME_PATTERN = rf"^{_PRINTABLE}*[^\s\x00-\x1f\x7f-\x9f]{_PRINTABLE}*$"


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Slug
    classes: list[str] = Field(min_length=2, description="class names, in the order the model outputs them",
                               json_schema_extra={"uniqueItems": True,
                                                  "items": {"type": "string", "pattern": CLASS_NAME_PATTERN}})
    strategy: str = Field("auto", description="how the next images are chosen: auto (the measured best, see the "
                                               "README), margin, least_confidence, entropy, bald, power_margin, random",
                          json_schema_extra={"enum": list(STRATEGIES)})
    cold_start: Literal["typiclust", "random"] | None = Field(
        None, description="how images are chosen before the first model: typiclust (typical images of clusters of "
                          "label-free features) or random; null: the strategy's own (random for random, else "
                          "typiclust)")
    mc_samples: int = Field(20, ge=2, le=100, description="MC-dropout passes per image for bald")
    query_size: int = Field(10, ge=1, le=10_000, description="new labels that trigger one retraining")
    pool_size: int = Field(0, ge=0, description="score a random subset of this many unlabeled images (0 = all)")
    model: str = Field("auto", description="small_cnn, resnet18, efficientnet_lite0, or auto: small_cnn for small "
                                           "grayscale images, else a pretrained backbone in embedding mode "
                                           "(decided by the first images added)",
                       json_schema_extra={"enum": [AUTO, *MODEL_NAMES]})
    pretrained: bool = True
    finetune: bool | None = Field(None, description="true: train the whole network (GPU hosts); false: embedding "
                                                    "mode (frozen backbone, a head on cached embeddings); null: "
                                                    "embedding mode for pretrained backbones, else whole network")
    input_size: int | None = Field(None, ge=32, le=512, description="pixels images are resized to for the model "
                                                                     "(null = the model's default, 224 for backbones)")
    training: TrainOptions = Field(default_factory=TrainOptions)
    seed: int = 0
    label_policy: LabelPolicy = Field("latest", description="which label trains the model when labelers disagree: "
                                                            "the most recent one, or the most common one")


class Project(ProjectCreate):
    """What object storage keeps under projects/<name>/project.json."""

    created_at: float


class ImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = Field(min_length=1, description="a built-in dataset (mnist5k, digits, photos) or an ImageFolder "
                                                   "path on the server")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    limit: int = Field(0, ge=0, description="import only the first N images (0 = all), for quick trials")


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    sample_id: str
    label: str
    lease_token: str | None = None


class LabelBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    labels: list[LabelIn] = Field(min_length=1, max_length=10_000)
    labeler: str | None = Field(None, min_length=1, max_length=200,
                                description="who labels: with authentication on, the token's labeler (another "
                                            "name is refused); with it off, any name (default 'anonymous')")


class LeaseRelease(BaseModel):
    """Samples handed back unlabeled (a closed page, a labeler who stops), so others get them now."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lease_token: str = Field(min_length=1, max_length=200, description="the token the samples were leased under")
    sample_ids: list[str] = Field(min_length=1, max_length=1000)
    labeler: str | None = Field(None, min_length=1, max_length=200,
                                description="who holds the leases: with authentication on, the token's labeler; "
                                            "with it off, the name used for the query (default 'anonymous')")


class LeaseReleaseResult(BaseModel):
    released: int = Field(description="leases ended; leases that expired, were labeled or are someone else's "
                                      "are left as they are and not counted")


class LabelRecord(BaseModel):
    """One line of the durable label log: a labeler's vote on a sample, or (retract) its withdrawal.

    Replayed in write order, the log gives every labeler's current vote per sample; the project's
    label_policy turns a sample's votes into the label the model trains on.
    """

    sample_id: str
    label: str = Field(description="the label voted for; for a retraction, the label withdrawn")
    labeler: str
    at: float
    batch: str
    retract: bool = Field(False, description="true: this labeler's vote on the sample is withdrawn (undo)")


class LabelerGrant(BaseModel):
    """One labeler of the API (config ALPIPE_LABELERS): its bearer token and the projects it may label."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1)
    projects: list[str] = Field(default_factory=lambda: ["*"], description="project names; '*' = every project")


class CurvePointOut(BaseModel):
    model_version: int
    n_labeled: int
    test_accuracy: float | None = Field(description="accuracy on the test split; None when it has no labels")
    train_s: float = 0.0
    created_at: float = 0.0


class TrainJob(BaseModel):
    project: str
    requested_at: float


class TrainRequestResult(BaseModel):
    job_id: str | None = Field(description="the queued train job; None when nothing new is there to train on")
    labeled: int
    model_labels: int


class EmbedJob(BaseModel):
    """One shard of a project's embedding pass: embed these images with the project's backbone."""

    project: str
    backbone: str = Field(description="the backbone and input size the pass was planned for (model@size), for "
                                      "logs and dashboards; the scorer embeds with the project's backbone")
    shard: int
    sample_ids: list[str]


class ScoreJob(BaseModel):
    project: str
    model_version: int
    shard: int
    n_shards: int
    sample_ids: list[str]


# --- HTTP responses of the labeling API ------------------------------------------------------------


class ProjectCounts(BaseModel):
    pool: int = Field(description="unlabeled pool samples")
    labeled: int
    leased: int = Field(description="pool samples under a live lease")
    test: int = Field(description="test samples with a known label")


class ModelInfo(BaseModel):
    version: int = Field(description="current model version; 0 = no model yet")
    n_labeled: int = Field(0, description="labels the current model was trained on")
    test_accuracy: float | None = None


class Disagreement(BaseModel):
    sample_id: str
    votes: dict[str, str] = Field(description="labeler -> its label")


class Disagreements(BaseModel):
    count: int = Field(description="labeled samples whose labelers do not all agree")
    samples: list[Disagreement] = Field(description="the most recently voted on of them (at most 50)")


class EmbeddingProgress(BaseModel):
    """The embedding pass of a project in embedding mode (each image through the frozen backbone once)."""

    backbone: str = Field(description="backbone id: model, input size and a digest of weights and preprocessing")
    total: int = Field(description="images the pass covers")
    done: int = Field(description="images with an embedding (computed now, or found from an earlier pass)")
    failed: int = Field(description="images that could not be decoded; they are skipped")
    images_per_s: float | None = Field(description="embedding speed so far; None before the first shard is done")
    eta_s: float | None = Field(description="seconds left at that speed; None when unknown")
    complete: bool = Field(description="every shard is done: training and scoring run on the embeddings")


class ProjectPublic(BaseModel):
    name: str
    project: Project
    counts: ProjectCounts
    model: ModelInfo
    live_ranking_version: int | None = Field(description="model version whose ranking is served (0 = cold start)")
    queues: dict[str, int] = Field(description="jobs waiting in the rq queues train and score (all projects)")
    curve: list[CurvePointOut]
    label_policy: LabelPolicy = Field(description="how the votes of several labelers become the training label")
    labelers: dict[str, int] = Field(default_factory=dict, description="labeler -> samples it has a vote on")
    disagreements: Disagreements = Field(default_factory=lambda: Disagreements(count=0, samples=[]))
    embedding: EmbeddingProgress | None = Field(None, description="the embedding pass; None when the project "
                                                                  "does not run in embedding mode")
    cold_start: Literal["typiclust", "pending", "failed", "random"] = Field(
        "random", description="the order served before the first model: typiclust (ready), pending (a scorer is "
                              "computing it; the seeded random order is served meanwhile), failed (the scorer's "
                              "job failed: the random order stays, the scorer's log says why; importing more "
                              "images queues it again), or random")


class ProjectSummary(BaseModel):
    name: str
    classes: list[str]
    strategy: str
    model: str
    created_at: float
    counts: ProjectCounts
    model_version: int


class UploadResult(BaseModel):
    sample_id: str
    split: Split
    created: bool = Field(description="false when the project already had this image (idempotent re-upload)")
    image_url: str


class ImportResult(BaseModel):
    dataset: str
    pool: int = Field(description="pool samples added by this call")
    test: int = Field(description="test samples added by this call")
    already_present: int = Field(description="samples the project had already (re-import is a no-op)")
    skipped: list[str] = Field(description="what was not imported, and why")
    batch: str | None = Field(description="the sample batch object written, None when nothing was new")


class Guess(BaseModel):
    label: str = Field(description="the class the served ranking's model finds most likely")
    confidence: float = Field(ge=0, le=1, description="that model's probability of the class")


# Before the first model, the cold-start ranking's TypiClust picks score above this and its seeded random
# order below it (in [0, 1)), so a client can tell a typical image from a random one.
COLD_START_PICK_FLOOR = 1.0
# Once a model exists, `auto`'s representative picks (alpipe.strategies.representative) score 1 + their margin,
# above the rest of the ranking's margins in [0, 1].
REPRESENTATIVE_PICK_FLOOR = 1.0


class QuerySample(BaseModel):
    sample_id: str
    score: float | None = Field(description="the strategy's score in the live ranking; None for a random fill-in")
    image_url: str
    guess: Guess | None = Field(None, description="the model's guess; None before the first model, for a random "
                                                  "fill-in, and for strategies that run no model (random)")


class QueryOut(BaseModel):
    model_version: int | None = Field(description="model version of the ranking served (0 = cold start)")
    lease_token: str
    expires_at: float
    samples: list[QuerySample]


class LabelResult(BaseModel):
    accepted: int = Field(description="labels written by this call")
    duplicates: int = Field(description="labels already recorded (or repeated in the batch): no-ops")
    labeled: int = Field(description="labeled samples of the project after this call")


class UndoResult(BaseModel):
    sample_id: str
    labeled: int = Field(description="labeled samples of the project after this call")
    training_label: str | None = Field(description="the sample's training label from the votes left; None when "
                                                   "no vote is left and it is back in the unlabeled pool")
    lease_token: str | None = Field(description="when the sample went back to the pool: it is leased to you "
                                                "again under this token (lease_ttl_s), so you can label it anew")


class Me(BaseModel):
    name: str = Field(description="who you act as: a labeler's name, 'admin', or 'anonymous' with auth off")
    is_admin: bool
    projects: list[str] = Field(description="projects you may label; ['*'] = all")
    auth: bool = Field(description="false when the API runs without authentication (local/dev mode)")
