"""The simulated oracle driving the HTTP API: the same experiment as alpipe.loop, through the services.

Each (strategy, seed) run is one project. The oracle asks for queries, answers them from the
dataset's known labels, then waits until the trainer has a model on all labels so far and the
scorers have made that model's ranking live: the round structure of the in-process loop, with
the work done by the services. Runs go on concurrently, so trainer and scorers stay busy.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .api_client import ApiClient
from .data import load_dataset
from .loop import ExperimentConfig
from .results import CurvePoint
from .storage import ObjectStore

log = logging.getLogger(__name__)


def project_name(experiment: str, strategy: str, seed: int) -> str:
    stem = re.sub(r"[^a-z0-9_-]+", "-", experiment.lower()).strip("-_")[:20] or "sim"
    return f"{stem}-{strategy}-s{seed}-{uuid.uuid4().hex[:6]}"


def wait_for_embeddings(api: ApiClient, project: str, *, timeout_s: float, poll_s: float = 0.5,
                        report_every_s: float = 5.0) -> dict | None:
    """In embedding mode, poll until the project's embedding pass is complete, logging its progress."""
    deadline = time.monotonic() + timeout_s
    next_report = time.monotonic()
    while True:
        embedding = api.json("GET", f"/projects/{project}").get("embedding")
        if embedding is None or embedding["complete"]:
            return embedding
        if time.monotonic() >= next_report:
            rate, eta = embedding["images_per_s"], embedding["eta_s"]
            log.info("%s: embedding %d/%d images%s%s", project, embedding["done"], embedding["total"],
                     f", {rate:.0f} img/s" if rate else "", f", ~{eta:.0f}s left" if eta is not None else "")
            next_report = time.monotonic() + report_every_s
        if time.monotonic() > deadline:
            raise RuntimeError(f"{project}: embedding pass not complete after {timeout_s:.0f}s: {embedding}")
        time.sleep(poll_s)


def wait_for_cold_start(api: ApiClient, project: str, *, timeout_s: float, poll_s: float = 0.25) -> str:
    """Poll until the project's cold-start order is ready (TypiClust's picks at the top), so the first
    labels are the ones a labeling team would get; the status ('typiclust', 'random' or 'failed')."""
    deadline = time.monotonic() + timeout_s
    status = api.json("GET", f"/projects/{project}")["cold_start"]
    if status == "pending":
        log.info("%s: waiting for a scorer to order the pool for the cold start (TypiClust)", project)
    while status == "pending":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{project}: no cold-start order after {timeout_s:.0f}s; are scorers running "
                               f"(alpipe worker scorer)? Their log says what they are doing")
        time.sleep(poll_s)
        status = api.json("GET", f"/projects/{project}")["cold_start"]
    if status == "failed":
        log.warning("%s: the cold-start job failed (see the scorer's log); the first labels follow the seeded "
                    "random order", project)
    return status


def wait_for_round(api: ApiClient, project: str, *, n_labeled: int, timeout_s: float, poll_s: float = 0.25) -> dict:
    """Poll until a model trained on n_labeled labels exists and its ranking is live."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = api.json("GET", f"/projects/{project}")
        model = info.get("model") or {}
        if model.get("n_labeled", 0) >= n_labeled and info.get("live_ranking_version") == model.get("version"):
            return info
        if time.monotonic() > deadline:
            raise RuntimeError(f"{project}: no model on {n_labeled} labels with a live ranking after "
                               f"{timeout_s:.0f}s (last state: model={model}, "
                               f"live ranking={info.get('live_ranking_version')}, queues={info.get('queues')})")
        time.sleep(poll_s)


def request_training(api: ApiClient, project: str, *, n_labeled: int, timeout_s: float, poll_s: float = 0.2) -> None:
    """Ask for a model on a partial batch; retried while another train job holds the project."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = api.json("POST", f"/projects/{project}/train")
        if answer["job_id"] or answer["model_labels"] >= n_labeled:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{project}: could not queue training on {n_labeled} labels within {timeout_s:.0f}s")
        time.sleep(poll_s)


def run_remote(api: ApiClient, *, strategy: str, seed: int, config: ExperimentConfig, classes: list[str],
               oracle: dict[str, str], experiment: str, round_timeout_s: float) -> list[CurvePoint]:
    """One learning curve through the API."""
    name = project_name(experiment, strategy, seed)
    training = config.train.as_dict()  # TrainConfig's fields are TrainOptions': the API body as it is
    api.json("POST", "/projects", json={
        "name": name, "classes": classes, "strategy": strategy, "query_size": config.query_size,
        "cold_start": config.cold_start, "mc_samples": config.mc_samples,
        "pool_size": config.pool_size, "model": config.model, "pretrained": config.pretrained,
        "finetune": config.finetune, "input_size": config.input_size, "training": training, "seed": seed})
    api.json("POST", f"/projects/{name}/samples/import", json={
        "dataset": config.dataset, "test_fraction": config.test_fraction, "split_seed": config.split_seed})
    # The first round's model waits for the embedding pass (embedding mode); say how it is going.
    embedding = wait_for_embeddings(api, name, timeout_s=round_timeout_s * 4)
    if embedding is not None:
        log.info("%s: embeddings ready: %d images by %s (%d unreadable)", name, embedding["done"],
                 embedding["backbone"], embedding["failed"])
    wait_for_cold_start(api, name, timeout_s=round_timeout_s)
    labeled, round_no, last = 0, 0, time.perf_counter()
    while labeled < config.budget:
        want = config.initial if round_no == 0 else min(config.query_size, config.budget - labeled)
        queries = api.json("GET", f"/projects/{name}/queries", params={"n": want, "labeler": "oracle"})
        samples = queries["samples"]
        if not samples:
            break  # the pool is exhausted
        answers = [{"sample_id": s["sample_id"], "label": oracle[s["sample_id"]],
                    "lease_token": queries["lease_token"]} for s in samples]
        api.json("POST", f"/projects/{name}/labels", json={"labels": answers, "labeler": "oracle"})
        labeled += len(answers)
        if len(answers) < config.query_size:  # a partial batch (or an initial set below query_size) trains on request
            request_training(api, name, n_labeled=labeled, timeout_s=round_timeout_s)
        info = wait_for_round(api, name, n_labeled=labeled, timeout_s=round_timeout_s)
        now = time.perf_counter()
        log.info("%-16s seed=%d round=%-3d labels=%-4d acc=%.4f  round=%.1fs (model v%d)", strategy, seed,
                 round_no, labeled, info["model"]["test_accuracy"], now - last, info["model"]["version"])
        last = now
        round_no += 1
    curve = api.json("GET", f"/projects/{name}/curve")
    # Scoring is spread over scorer jobs and overlaps other projects' work: not attributed per round.
    return [CurvePoint(strategy, seed, i, p["n_labeled"], p["test_accuracy"], p.get("train_s", 0.0), None)
            for i, p in enumerate(curve)]


def simulate_via_api(config: ExperimentConfig, *, api_url: str, store: ObjectStore, cache_dir: Path,
                     experiment: str, round_timeout_s: float = 600.0, token: str = "") -> list[CurvePoint]:
    """Every strategy × seed as concurrent projects on the API; curve points in a stable order.

    token: the admin token when the API has authentication on (the oracle creates projects).
    """
    config.validate()
    manifest = load_dataset(config.dataset, store=store, cache_dir=cache_dir)
    oracle = {s.id: s.label for s in manifest.samples if s.label is not None}
    with ApiClient(api_url, timeout_s=120.0, token=token, token_hint="set ALPIPE_TOKEN") as api:
        api.json("GET", "/health")
        runs = [(strategy, seed) for seed in range(config.seeds) for strategy in config.strategies]
        with ThreadPoolExecutor(max_workers=len(runs)) as pool:
            futures = [pool.submit(run_remote, api, strategy=strategy, seed=seed, config=config,
                                   classes=manifest.classes, oracle=oracle, experiment=experiment,
                                   round_timeout_s=round_timeout_s) for strategy, seed in runs]
            return [point for future in futures for point in future.result()]
