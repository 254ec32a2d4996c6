"""The one place where object keys, Redis keys, queue names and rq job paths are spelled.

Object keys (the durable source of truth):
    images/<sha256>                              image bytes, content-addressed
    datasets/<name>/manifest.json                a materialized dataset (samples, classes, splits)
    projects/<p>/project.json                    project definition
    projects/<p>/samples/<ts>-<batch>.jsonl      sample records (id, split, known label) added in one call
    projects/<p>/labels/<ts>-<batch>.jsonl       append-only label log, one object per accepted batch
    projects/<p>/models/v<NNNNNN>.pt             immutable checkpoint of model version N
    projects/<p>/models/v<NNNNNN>.json           its metrics (test accuracy, n_labeled, timings)
    projects/<p>/models/current.json             pointer to the newest complete version
    projects/<p>/labelstudio/link.json           the Label Studio project it is connected to
    projects/<p>/labelstudio/tasks/<ts>-<batch>.jsonl
                                                 Label Studio task id -> sample id, per ingest
    projects/<p>/labelstudio/annotations/<ts>-<batch>.jsonl
                                                 Label Studio annotation id -> "<sample> <labeler>"
    experiments/<name>/<file>                    results of a simulate run
    cache/datasets/<name>/<HxWxC>.pt             decoded images of a dataset at one input size
    embeddings/<backbone>/<sha256>               an image's embedding by one backbone identity
                                                 (raw float16 values), shared by every project
    embeddings/<backbone>/backbone.json          what the backbone id stands for (model, weights
                                                 digest, input size, preprocessing)
"""

QUEUE_TRAIN = "train"
QUEUE_SCORE = "score"

# The rq jobs the workers run, by import path: the library enqueues them without importing the services.
JOB_TRAIN = "services.trainer.jobs.train"
JOB_SCORE_SHARD = "services.scorer.jobs.score_shard"
JOB_EMBED_SHARD = "services.scorer.jobs.embed_shard"
JOB_COLD_START = "services.scorer.jobs.cold_start"
JOB_LABELSTUDIO_INGEST = "services.scorer.jobs.labelstudio_ingest"
JOB_LABELSTUDIO_PUSH = "services.scorer.jobs.labelstudio_push"

# --- object storage -------------------------------------------------------------------------------


def image_key(sample_id: str) -> str:
    return f"images/{sample_id}"


def dataset_manifest_key(name: str) -> str:
    return f"datasets/{name}/manifest.json"


def project_prefix(project: str) -> str:
    return f"projects/{project}/"


def project_key(project: str) -> str:
    return f"projects/{project}/project.json"


def _batch_key(prefix: str, stamp: str, batch_id: str) -> str:
    """A batch object: the stamp first, so listing a folder gives its batches in write order."""
    return f"{prefix}{stamp}-{batch_id}.jsonl"


def samples_prefix(project: str) -> str:
    return f"projects/{project}/samples/"


def sample_batch_key(project: str, stamp: str, batch_id: str) -> str:
    return _batch_key(samples_prefix(project), stamp, batch_id)


def label_log_prefix(project: str) -> str:
    return f"projects/{project}/labels/"


def label_log_key(project: str, stamp: str, batch_id: str) -> str:
    return _batch_key(label_log_prefix(project), stamp, batch_id)


def labelstudio_link_key(project: str) -> str:
    return f"projects/{project}/labelstudio/link.json"


def labelstudio_map_prefix(project: str, kind: str) -> str:
    return f"projects/{project}/labelstudio/{kind}/"


def labelstudio_map_key(project: str, kind: str, stamp: str, batch_id: str) -> str:
    return _batch_key(labelstudio_map_prefix(project, kind), stamp, batch_id)


def models_prefix(project: str) -> str:
    return f"projects/{project}/models/"


def checkpoint_key(project: str, version: int) -> str:
    return f"projects/{project}/models/v{version:06d}.pt"


def model_metrics_key(project: str, version: int) -> str:
    return f"projects/{project}/models/v{version:06d}.json"


def current_model_key(project: str) -> str:
    return f"projects/{project}/models/current.json"


def embedding_key(backbone_id: str, sample_id: str) -> str:
    """An image's embedding by one backbone identity (alpipe.embeddings.BackboneIdentity.id)."""
    return f"embeddings/{backbone_id}/{sample_id}"


def embedding_identity_key(backbone_id: str) -> str:
    return f"embeddings/{backbone_id}/backbone.json"


def experiment_key(name: str, filename: str) -> str:
    return f"experiments/{name}/{filename}"


def health_probe_key() -> str:
    """An object /health looks up (absent is fine): proves the store answers."""
    return "health/probe"


# --- redis ----------------------------------------------------------------------------------------


def redis_key(project: str, *parts: object) -> str:
    """`alpipe:{project}:part:part`; braces keep one project's keys in one Redis Cluster slot."""
    return ":".join(["alpipe", "{" + project + "}", *(str(p) for p in parts)])


def labelstudio_links_key() -> str:
    """Redis hash: Label Studio project id -> the alpipe project connected to it."""
    return "alpipe:labelstudio:links"


def tensor_cache_key(dataset: str, size: int, channels: int) -> str:
    """Decoded images of a dataset at one input size: decode once, reuse every run."""
    return f"cache/datasets/{dataset}/{size}x{size}x{channels}.pt"


# --- redis: work in flight (trainer and scorer jobs, the reconciler) -------------------------------


def train_lock_key(project: str) -> str:
    """Held by the one trainer training the project; its TTL is the trainer's heartbeat."""
    return redis_key(project, "train_lock")


def score_heartbeat_key(project: str, version: int, shard: int) -> str:
    """Set (with a TTL, refreshed) while a scorer works on one shard of a ranking."""
    return redis_key(project, "hb", "score", version, shard)


def shard_plan_key(project: str, version: int) -> str:
    """Hash shard -> JSON list of sample ids: the fixed shards of ranking `version`."""
    return redis_key(project, "ranking", version, "plan")


def shard_jobs_key(project: str, version: int) -> str:
    """Hash shard -> rq job id of its latest attempt, and '<shard>:attempts' -> attempts so far."""
    return redis_key(project, "ranking", version, "jobs")


def fanout_lock_key(project: str, version: int) -> str:
    """Taken while the shards of ranking `version` are planned, so the plan is written once."""
    return redis_key(project, "ranking", version, "fanout")


def redis_run_id_key() -> str:
    """The run_id of the Redis server the reconciler last checked: a different one means Redis restarted."""
    return "alpipe:redis_run_id"


def reconciler_lease_key() -> str:
    """Which API process runs the reconciler: one at a time, however many API processes and replicas."""
    return "alpipe:reconciler:lease"


def train_attempts_key(project: str) -> str:
    """Hash labeled-count -> train jobs enqueued for it, so a failing train is not retried forever."""
    return redis_key(project, "train_attempts")


# --- redis: the embedding pass of a project (see alpipe.pipeline) ----------------------------------


def embed_key(project: str, *parts: object) -> str:
    """Keys of a project's embedding pass: `meta` (counters, backbone id), `plan` (shard -> ids),
    `jobs` (shard -> job id, attempts), `done` (finished shards), `failed` (sample -> why)."""
    return redis_key(project, "embed", *parts)


def embed_claim_key(backbone_id: str, sample_id: str) -> str:
    """Held (with a TTL) by the scorer computing one image's embedding, so that passes of several
    projects over the same image compute it once; 'failed <why>' when it could not be decoded."""
    return f"alpipe:embed_claim:{backbone_id}:{sample_id}"


def embed_heartbeat_key(project: str, shard: int) -> str:
    """Set (with a TTL, refreshed) while a scorer embeds one shard of the project's images."""
    return redis_key(project, "hb", "embed", shard)


def _model_file_version(key: str, suffix: str) -> int | None:
    name = key.rpartition("/")[2]
    if len(name) == 7 + len(suffix) and name.startswith("v") and name.endswith(suffix) and name[1:7].isdigit():
        return int(name[1:7])
    return None


def checkpoint_version(key: str) -> int | None:
    """The version N of a checkpoint key (inverse of checkpoint_key), None for any other key."""
    return _model_file_version(key, ".pt")


def metrics_version(key: str) -> int | None:
    """The version N of a model metrics key (inverse of model_metrics_key), None for any other key."""
    return _model_file_version(key, ".json")
