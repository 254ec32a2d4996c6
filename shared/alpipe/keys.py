"""The one place where object keys, Redis keys and queue names are spelled.

Object keys (the durable source of truth):
    images/<sha256>                              image bytes, content-addressed
    datasets/<name>/manifest.json                a materialized dataset (samples, classes, splits)
    projects/<p>/project.json                    project definition
    projects/<p>/samples/<ts>-<batch>.jsonl      sample records (id, split, known label) added in one call
    projects/<p>/labels/<ts>-<batch>.jsonl       append-only label log, one object per accepted batch
    projects/<p>/models/v<NNNNNN>.pt             immutable checkpoint of model version N
    projects/<p>/models/v<NNNNNN>.json           its metrics (test accuracy, n_labeled, timings)
    projects/<p>/models/current.json             pointer to the newest complete version
    experiments/<name>/<file>                    results of a simulate run
    cache/datasets/<name>/<HxWxC>.pt             decoded images of a dataset at one input size
"""

QUEUE_TRAIN = "train"
QUEUE_SCORE = "score"

# --- object storage -------------------------------------------------------------------------------


def image_key(sample_id: str) -> str:
    return f"images/{sample_id}"


def dataset_manifest_key(name: str) -> str:
    return f"datasets/{name}/manifest.json"


def project_prefix(project: str) -> str:
    return f"projects/{project}/"


def project_key(project: str) -> str:
    return f"projects/{project}/project.json"


def sample_batch_key(project: str, stamp: str, batch_id: str) -> str:
    return f"projects/{project}/samples/{stamp}-{batch_id}.jsonl"


def samples_prefix(project: str) -> str:
    return f"projects/{project}/samples/"


def label_log_prefix(project: str) -> str:
    return f"projects/{project}/labels/"


def label_log_key(project: str, stamp: str, batch_id: str) -> str:
    return f"projects/{project}/labels/{stamp}-{batch_id}.jsonl"


def models_prefix(project: str) -> str:
    return f"projects/{project}/models/"


def checkpoint_key(project: str, version: int) -> str:
    return f"projects/{project}/models/v{version:06d}.pt"


def model_metrics_key(project: str, version: int) -> str:
    return f"projects/{project}/models/v{version:06d}.json"


def current_model_key(project: str) -> str:
    return f"projects/{project}/models/current.json"


def experiment_key(name: str, filename: str) -> str:
    return f"experiments/{name}/{filename}"


# --- redis ----------------------------------------------------------------------------------------


def redis_key(project: str, *parts: object) -> str:
    """`alpipe:{project}:part:part`; braces keep one project's keys in one Redis Cluster slot."""
    return ":".join(["alpipe", "{" + project + "}", *(str(p) for p in parts)])


def tensor_cache_key(dataset: str, size: int, channels: int) -> str:
    """Decoded images of a dataset at one input size: decode once, reuse every run."""
    return f"cache/datasets/{dataset}/{size}x{size}x{channels}.pt"
