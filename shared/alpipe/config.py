"""Every knob, read from the environment (prefix ALPIPE_) in one place."""

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .schemas import LabelerGrant


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALPIPE_", env_file=".env", extra="ignore")

    # Object storage: the local directory is the embedded default; set s3_endpoint for MinIO/S3.
    data_dir: Path = Path("data")
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "alpipe"
    s3_secure: bool = False
    s3_region: str = "us-east-1"

    # Redis: empty means `alpipe up` starts its own redis-server on a free port.
    redis_url: str = Field("", validation_alias=AliasChoices("ALPIPE_REDIS_URL", "REDIS_URL"))

    # Compute
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int = 0  # 0 = torch's default; set to cores / workers so workers do not fight
    score_batch_size: int = 256
    shard_size: int = 2000  # pool samples per score job
    embed_shard_size: int = 256  # images per embedding-pass job: a killed scorer loses little
    embed_batch_size: int = 0  # images per backbone forward; 0 = 32 on a CPU, 256 on CUDA
    # Workers lower their CPU priority by this much (nice), so on a host they share with the API, labelers'
    # requests are answered first and training and scoring take the CPU the API leaves (0 = unchanged).
    worker_nice: int = Field(10, ge=0, le=19)

    # Labeling
    lease_ttl_s: int = 600
    max_upload_bytes: int = 20 * 1024 * 1024
    job_timeout_s: int = 1800

    # Recovery from crashed workers: a job's heartbeat key expires after heartbeat_ttl_s, and the
    # reconciler (run by the API every reconcile_interval_s) re-enqueues work nobody is doing.
    heartbeat_ttl_s: float = 15.0
    reconcile_interval_s: float = 2.0
    # Decoded-image tensors a worker keeps in memory, so each image is decoded once per process.
    tensor_cache_mb: int = 2048
    # Embeddings a worker keeps in memory (float16: a 5,000-image pool by efficientnet_lite0 is 12.5 MiB).
    embedding_cache_mb: int = 1024
    # A score shard (or a train at one label count) that failed or whose worker died this many
    # times is left alone (the reconciler reports it) rather than retried forever.
    max_job_attempts: int = 5

    # Test-only: slow a worker down so crash tests can kill it mid-job (0 = off, as in production).
    # A scorer sleeps this long after taking a shard and before writing its scores; a trainer
    # sleeps this long after every epoch.
    test_score_delay_s: float = 0.0
    test_train_epoch_delay_s: float = 0.0

    # API server. Worker processes share the port (uvicorn's supervisor); 0 = one per core, 2 to 8.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = Field(0, ge=0)
    # One log line per request (uvicorn's access log); off by default: it costs a tenth of a request.
    api_access_log: bool = False

    # Access control. Both empty = authentication off (local/dev: anyone who reaches the API acts as
    # admin). Otherwise every request but /health, /metrics, the docs and /ui carries
    # `Authorization: Bearer <token>`: the admin token may do everything, a labeler's token may
    # query and label its projects. ALPIPE_LABELERS is JSON: {"ada": {"token": "...", "projects": ["digits"]}}.
    admin_token: str = ""
    labelers: Annotated[dict[str, LabelerGrant], NoDecode] = {}
    # Command-line clients (`alpipe label`, `alpipe export`): the token they send as that Bearer token.
    token: str = ""

    # Label Studio as a client (alpipe serves its ML-backend protocol under /labelstudio). Where alpipe
    # reaches Label Studio, when the hostname Label Studio sends in /setup is not that (its default
    # is http://localhost:8080), and the token alpipe uses there: a personal access token, or a legacy
    # one. Empty: what /setup's extra_params or Label Studio itself send.
    label_studio_url: str = ""
    label_studio_token: str = ""

    @field_validator("labelers", mode="before")
    @classmethod
    def _labelers_from_json(cls, value: Any) -> Any:
        """ALPIPE_LABELERS arrives as JSON text; empty means no labelers (as `ALPIPE_LABELERS=` in .env)."""
        if not isinstance(value, str):
            return value
        if not value.strip():
            return {}
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f'ALPIPE_LABELERS must be JSON such as {{"ada": {{"token": "...", "projects": '
                             f'["digits"]}}}}: {e}') from None


def api_worker_count(settings: Settings) -> int:
    """How many API worker processes to run: the setting, or one per core (at least 2, at most 8)."""
    return settings.api_workers or max(2, min(os.cpu_count() or 1, 8))


@lru_cache
def get_settings() -> Settings:
    return Settings()
