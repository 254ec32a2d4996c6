"""Embedding mode over HTTP: model auto, the embedding pass's progress in GET /projects/{p} and /metrics."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from rq import Queue

from alpipe import keys
from alpipe.storage import ObjectStore
from services.scorer import jobs as scorer_jobs
from tests.integration.test_api import import_folder, make_image_folder, new_project
from tests.integration.test_workers import run_burst


def colour_folder(root: Path, per_class: int = 6) -> Path:
    """An ImageFolder of 48-pixel colour photos-to-be: noise in two tints."""
    rng = np.random.default_rng(1)
    for c, tint in enumerate(("warm", "cold")):
        (root / tint).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (48, 48, 3)).astype(np.uint8)
            pixels[..., 0 if c == 0 else 2] += 120
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
            (root / tint / f"{i}.png").write_bytes(buf.getvalue())
    return root


def test_auto_is_small_cnn_for_small_grayscale_images(app_for, local: ObjectStore, tmp_path: Path) -> None:
    client = app_for(local)
    assert new_project(client)["project"]["model"] == "auto"
    import_folder(client, "pets", make_image_folder(tmp_path / "gray", ["cat", "dog", "fox"], 5))
    info = client.get("/projects/pets").json()
    assert info["project"]["model"] == "small_cnn" and info["embedding"] is None
    assert local.get_json(keys.project_key("pets"))["model"] == "small_cnn"  # the durable definition too
    # No embedding pass; only the cold-start order is queued for the scorers.
    queued = Queue(keys.QUEUE_SCORE, connection=client.app.state.clients.redis).get_job_ids()
    assert queued == [f"coldstart-pets-n{info['counts']['pool']}"]


def test_auto_is_a_backbone_in_embedding_mode_for_colour_images(app_for, local: ObjectStore, tmp_path: Path,
                                                                redis_client) -> None:
    client = app_for(local, embed_shard_size=5)
    new_project(client, "tints", ["warm", "cold"], input_size=32)
    result = import_folder(client, "tints", colour_folder(tmp_path / "colour"), test_fraction=0.25)
    info = client.get("/projects/tints").json()
    assert info["project"]["model"] == "efficientnet_lite0" and info["project"]["finetune"] is None
    assert local.get_json(keys.project_key("tints"))["model"] == "efficientnet_lite0"
    total = result["pool"] + result["test"]
    assert info["embedding"] == {"backbone": "efficientnet_lite0@32", "total": total, "done": 0, "failed": 0,
                                 "images_per_s": None, "eta_s": None, "complete": False}
    jobs = Queue(keys.QUEUE_SCORE, connection=redis_client).get_job_ids()
    assert jobs == [f"embed-tints-s{i}" for i in range(-(-total // 5))]
    metrics = client.get("/metrics").text
    assert f'alpipe_embedding_images{{project="tints",state="total"}} {float(total)}' in metrics
    assert 'alpipe_embedding_images{project="tints",state="done"} 0.0' in metrics
    # Labels are taken while the pass runs (cold-start order), but no training is queued.
    query = client.get("/projects/tints/queries", params={"n": 2}).json()
    assert query["model_version"] == 0
    labels = [{"sample_id": s["sample_id"], "label": "warm", "lease_token": query["lease_token"]}
              for s in query["samples"]]
    assert client.post("/projects/tints/labels", json={"labels": labels}).status_code == 200
    assert client.post("/projects/tints/train").json()["job_id"] is None
    assert Queue(keys.QUEUE_TRAIN, connection=redis_client).count == 0

    # The scorers run the pass; its end shows everywhere, and the training that waited is queued.
    scorer_jobs.configure(client.app.state.settings, redis_client=redis_client, store=local)
    run_burst(redis_client, keys.QUEUE_SCORE)
    embedding = client.get("/projects/tints").json()["embedding"]
    assert embedding["complete"] and embedding["done"] == total and embedding["eta_s"] == 0.0
    assert embedding["backbone"].startswith("efficientnet_lite0-32-") and embedding["images_per_s"] > 0
    metrics = client.get("/metrics").text
    assert f'alpipe_embedding_images{{project="tints",state="done"}} {float(total)}' in metrics
    assert 'alpipe_embedding_eta_seconds{project="tints"} 0.0' in metrics
    # The train request made during the pass was kept: the job completing the pass queued it.
    assert Queue(keys.QUEUE_TRAIN, connection=redis_client).get_job_ids() == ["train-tints-n2"]


def test_finetune_keeps_whole_network_training(app_for, local: ObjectStore, tmp_path: Path) -> None:
    client = app_for(local)
    new_project(client, "tints", ["warm", "cold"], finetune=True)
    import_folder(client, "tints", colour_folder(tmp_path / "colour"))
    info = client.get("/projects/tints").json()
    assert info["project"]["model"] == "efficientnet_lite0" and info["project"]["finetune"] is True
    assert info["project"]["input_size"] == 64  # 48-px images: no upsampling to 224
    assert info["embedding"] is None
