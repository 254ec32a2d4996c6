"""`alpipe simulate` in one process, run as users run it: the output contract and bad input."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from alpipe.train_config import TrainConfig

CONTRACT = ["strategy", "seed", "round", "n_labeled", "test_accuracy"]


def alpipe(*args: str, data_dir, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALPIPE_DATA_DIR": str(data_dir), "ALPIPE_TORCH_THREADS": "1"}
    env.pop("ALPIPE_S3_ENDPOINT", None)
    return subprocess.run([sys.executable, "-m", "alpipe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def test_short_simulate_run_writes_the_contract(data_dir, tmp_path):
    out = tmp_path / "runs" / "short"
    result = alpipe("simulate", "--dataset", "digits", "--strategies", "margin,entropy,random", "--seeds", "2",
                    "--initial", "20", "--query-size", "15", "--budget", "60", "--stop", "epochs:2",
                    "--out", str(out), data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert list(rows[0]) == CONTRACT
    for strategy in ("margin", "entropy", "random"):
        for seed in ("0", "1"):
            run = [r for r in rows if r["strategy"] == strategy and r["seed"] == seed]
            # initial set first, the budget last, the final round a partial one (20+15+15+10).
            assert [int(r["n_labeled"]) for r in run] == [20, 35, 50, 60]
            assert [int(r["round"]) for r in run] == [0, 1, 2, 3]
            assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in run)
    # margin and entropy start from the same TypiClust set (and model init) per seed, so they agree there.
    for seed in ("0", "1"):
        first = {r["strategy"]: r["test_accuracy"] for r in rows if r["seed"] == seed and r["round"] == "0"}
        assert first["margin"] == first["entropy"]
    # One progress line per round: strategy, seed, labels, accuracy, seconds.
    progress = [line for line in result.stderr.splitlines() if "round=" in line]
    assert len(progress) == 3 * 2 * 4
    assert "labels=60" in progress[-1] and "acc=" in progress[-1] and "train=" in progress[-1]

    summary = json.loads((out / "summary.json").read_text())
    margin = summary["strategies"]["margin"]
    assert margin["mean_curve"]["n_labeled"] == [20, 35, 50, 60]
    savings = margin["label_savings"]
    assert [row["baseline_labels"] for row in savings["per_budget"]] == [35, 50, 60]
    assert "median_extra_fraction" in savings
    assert "label_savings" not in summary["strategies"]["random"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "curves.png" in result.stdout
    # The final model of each run, in the trainer's checkpoint shape: no optimizer state, the same config.
    checkpoint = torch.load(data_dir / "store" / "experiments" / "short" / "checkpoints" / "margin-seed1.pt",
                            weights_only=True)
    assert "optimizer" not in checkpoint and checkpoint["model_version"] == 3
    assert checkpoint["config"] == {"train": TrainConfig(stop="epochs:2").as_dict(), "n_labeled": 60, "seed": 1,
                                    "source": "short/margin"}


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (16, 16), value).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_with_a_corrupt_file_is_reported_and_skipped(data_dir, tmp_path):
    folder = tmp_path / "shapes"
    for cls, base in (("6_great_dane", 20), ("cat", 200)):
        (folder / cls).mkdir(parents=True)
        for i in range(12):
            (folder / cls / f"{i}.png").write_bytes(png(base + i))
    (folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    result = alpipe("simulate", "--dataset", str(folder), "--strategies", "margin,random", "--seeds", "1",
                    "--initial", "4", "--query-size", "4", "--budget", "12", "--test-fraction", "0.25",
                    "--stop", "epochs:1", "--out", str(out), data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cat/broken.jpg" in result.stderr and "not a readable image" in result.stderr
    assert (out / "curves.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--dataset", "mnist6k"], "unknown dataset 'mnist6k'"),
    (["--model", "vgg99"], "unknown model 'vgg99'"),
    (["--strategies", "margin,smallest"], "unknown strategy 'smallest'"),
    (["--initial", "50", "--budget", "30"], "--budget (30) is smaller than the initial set"),
    (["--strategies", "bald", "--model", "efficientnet_lite0"], "has no dropout"),
    (["--strategies", "bald", "--mc-samples", "1"], "--mc-samples must be at least 2"),
    (["--cold-start", "kmeans"], "unknown cold start 'kmeans'; choose from: typiclust, random"),
    (["--stop", "forever"], "unknown stopping rule 'forever'"),
    (["--dataset", "EMPTY"], "no readable images"),
    (["--model", "small_cnn", "--no-finetune"], "small_cnn has no pretrained backbone"),
    (["--model", "efficientnet_lite0", "--no-pretrained", "--no-finetune"], "is not pretrained"),
    (["--model", "efficientnet_lite0", "--input-size", "8"], "--input-size must be between 32 and 512"),
    (["--dataset", "digits", "--model", "efficientnet_lite0", "--input-size", "32", "--weights", "GARBAGE"],
     "cannot load weights from"),
])
def test_bad_input_is_one_clear_line_and_no_output(data_dir, tmp_path, args, message):
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "notes.txt").write_text("not an image")
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"these are not weights")
    args = [str(empty) if a == "EMPTY" else str(garbage) if a == "GARBAGE" else a for a in args]
    out = tmp_path / "out"
    result = alpipe("simulate", *args, "--seeds", "1", "--out", str(out), data_dir=data_dir, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("alpipe: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "curves.csv").exists()
    assert not list(data_dir.glob("store/embeddings/*/*")), "no embedding was written"


def test_photos_in_embedding_mode_by_default(data_dir, tmp_path):
    """model auto on colour photos: efficientnet_lite0 in embedding mode, the pass shown as it runs."""
    out = tmp_path / "photos"
    args = ["simulate", "--dataset", "photos", "--strategies", "margin,random", "--seeds", "1", "--initial", "16",
            "--query-size", "16", "--budget", "48", "--input-size", "32", "--out", str(out)]
    result = alpipe(*args, data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model efficientnet_lite0 (embedding mode, backbone efficientnet_lite0-32-" in result.stderr
    assert "embedding photos" in result.stderr and "2000 computed, 0 already stored" in result.stderr
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert [int(r["n_labeled"]) for r in rows if r["strategy"] == "margin"] == [16, 32, 48]
    assert float(rows[-1]["test_accuracy"]) > 0.5  # 8 classes: chance is 0.125
    again = alpipe(*args, data_dir=data_dir)  # a second run embeds nothing
    assert again.returncode == 0 and "0 computed, 2000 already stored" in again.stderr
