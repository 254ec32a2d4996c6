"""Every knob, read from the environment (prefix ALPIPE_) in one place."""

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    # A score shard (or a train at one label count) that failed or whose worker died this many
    # times is left alone (the reconciler reports it) rather than retried forever.
    max_job_attempts: int = 5

    # Test-only: slow a worker down so crash tests can kill it mid-job (0 = off, as in production).
    # A scorer sleeps this long after taking a shard and before writing its scores; a trainer
    # sleeps this long after every epoch.
    test_score_delay_s: float = 0.0
    test_train_epoch_delay_s: float = 0.0

    # API server
    api_host: str = "127.0.0.1"
    api_port: int = 8000


@lru_cache
def get_settings() -> Settings:
    return Settings()
