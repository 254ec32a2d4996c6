"""The whole local stack through HTTP: redis-server, API, trainer and two scorers as real processes."""

import csv
import json
import subprocess
import sys

import httpx
import pytest

from alpipe.config import Settings
from alpipe.loop import ExperimentConfig
from alpipe.remote import simulate_via_api
from alpipe.stack import LocalStack
from alpipe.storage import LocalStore
from alpipe.training import TrainConfig


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("stack")
    settings = Settings(data_dir=data_dir, redis_url="", shard_size=300)
    with LocalStack(settings, scorers=2, echo=False, extra_env={"ALPIPE_SHARD_SIZE": "300"}) as running:
        yield running


def test_simulated_oracle_through_the_services(stack, tmp_path):
    config = ExperimentConfig(dataset="digits", strategies=("margin", "random"), seeds=1, initial=20,
                              query_size=10, budget=40, train=TrainConfig(stop="epochs:2"))
    store = LocalStore(stack.data_dir / "store")
    points = simulate_via_api(config, api_url=stack.api_url, store=store, cache_dir=stack.data_dir / "datasets",
                              experiment="e2e", round_timeout_s=120)
    for strategy in ("margin", "random"):
        curve = [p for p in points if p.strategy == strategy]
        assert [p.n_labeled for p in curve] == [20, 30, 40]
        assert [p.round for p in curve] == [0, 1, 2]
        assert all(0.0 <= p.test_accuracy <= 1.0 for p in curve)
        assert curve[-1].test_accuracy > 0.15  # better than chance on 10 classes after 40 labels

    projects = httpx.get(f"{stack.api_url}/projects").json()
    assert len(projects) >= 2
    stack.check_alive()


def test_an_initial_set_smaller_than_the_query_size_gets_its_model_through_the_services(stack):
    """Training is due every query_size labels; the oracle asks for a model on its 5 initial labels."""
    config = ExperimentConfig(dataset="digits", strategies=("random",), seeds=1, initial=5, query_size=10,
                              budget=15, train=TrainConfig(stop="epochs:1"))
    store = LocalStore(stack.data_dir / "store")
    points = simulate_via_api(config, api_url=stack.api_url, store=store, cache_dir=stack.data_dir / "datasets",
                              experiment="e2e-small-initial", round_timeout_s=120)
    assert [p.n_labeled for p in points] == [5, 15]


def test_cli_simulate_against_the_running_api(stack, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "alpipe.cli", "simulate", "--api", stack.api_url, "--dataset", "digits",
         "--strategies", "least_confidence,random", "--seeds", "1", "--initial", "20", "--query-size", "10",
         "--budget", "35", "--stop", "epochs:1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "ALPIPE_DATA_DIR": str(stack.data_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert list(rows[0]) == ["strategy", "seed", "round", "n_labeled", "test_accuracy"]
    # 20 initial, 30, then a last partial batch of 5 that still gets its own model.
    assert [int(r["n_labeled"]) for r in rows if r["strategy"] == "random"] == [20, 30, 35]
    summary = json.loads((out / "summary.json").read_text())
    assert "label_savings" in summary["strategies"]["least_confidence"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_photos_in_embedding_mode_through_the_services(stack, tmp_path):
    """model auto on colour photos through the services: the scorers' embedding pass, then head rounds."""
    out = tmp_path / "photos"
    result = subprocess.run(
        [sys.executable, "-m", "alpipe.cli", "simulate", "--api", stack.api_url, "--dataset", "photos",
         "--strategies", "margin", "--seeds", "1", "--initial", "16", "--query-size", "16", "--budget", "48",
         "--input-size", "32", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "ALPIPE_DATA_DIR": str(stack.data_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    ready = [line for line in result.stderr.splitlines() if "embeddings ready" in line]
    assert len(ready) == 1 and "2000 images by efficientnet_lite0-32-" in ready[0], result.stderr[-3000:]
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert [int(r["n_labeled"]) for r in rows] == [16, 32, 48]
    assert float(rows[-1]["test_accuracy"]) > 0.5  # 8 classes
    name = next(p["name"] for p in httpx.get(f"{stack.api_url}/projects").json() if p["name"].startswith("photos"))
    info = httpx.get(f"{stack.api_url}/projects/{name}").json()
    assert info["project"]["model"] == "efficientnet_lite0" and info["project"]["input_size"] == 32
    assert info["embedding"]["complete"] and info["embedding"]["done"] == 2000
    stack.check_alive()
