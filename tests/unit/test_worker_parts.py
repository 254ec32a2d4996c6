"""Pure parts of the trainer and scorer: key parsing, the tensor cache, seeded scores, configs."""

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alpipe import keys
from alpipe.schemas import Project, TrainOptions
from alpipe.scoring import strategy_scores
from alpipe.storage import LocalStore
from alpipe.strategies import get_strategy
from alpipe.tensor_cache import TensorCache
from alpipe.trainer_core import train_config


def test_checkpoint_version_inverts_checkpoint_key():
    assert keys.checkpoint_version(keys.checkpoint_key("p", 12)) == 12
    assert keys.checkpoint_version(keys.model_metrics_key("p", 12)) is None
    assert keys.checkpoint_version(keys.current_model_key("p")) is None


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("threads", [1, 4])
def test_tensor_cache_decodes_once_and_stays_within_its_budget(tmp_path, threads):
    store = LocalStore(tmp_path)
    for i in range(5):
        store.put_bytes(keys.image_key(f"s{i}"), _png(10 * i))
    one = 8 * 8  # bytes of one 1x8x8 uint8 image
    cache = TensorCache(3 * one, fetch_threads=threads)
    batch = cache.get_many(store, ["s0", "s1", "s2"], size=8, channels=1)
    assert batch.shape == (3, 1, 8, 8) and [int(batch[i, 0, 0, 0]) for i in range(3)] == [0, 10, 20]
    assert (cache.hits, cache.misses) == (0, 3)
    cache.get_many(store, ["s2", "s0"], size=8, channels=1)
    assert (cache.hits, cache.misses) == (2, 3)
    cache.get_many(store, ["s3"], size=8, channels=1)  # evicts s1, the least recently used
    assert len(cache) == 3 and cache.nbytes == 3 * one
    cache.get_many(store, ["s1"], size=8, channels=1)
    assert cache.misses == 5
    rgb = cache.get_many(store, ["s0"], size=4, channels=3)  # another size/channels is another entry
    assert rgb.shape == (1, 3, 4, 4) and cache.misses == 6


def test_random_scores_repeat_for_the_same_shard_and_differ_between_shards():
    probs = np.full((50, 3), 1 / 3)
    random = get_strategy("random")
    a = strategy_scores(random, probs, seed=0, version=1, shard=0)
    assert np.array_equal(a, strategy_scores(random, probs, seed=0, version=1, shard=0))
    assert not np.array_equal(a, strategy_scores(random, probs, seed=0, version=1, shard=1))
    margin = strategy_scores(get_strategy("margin"), np.array([[0.5, 0.5, 0], [0.9, 0.1, 0]]), seed=0, version=1,
                             shard=0)
    assert margin.tolist() == pytest.approx([1.0, 0.2])


def test_train_config_mirrors_the_project_and_needs_a_test_split_for_test_holdout():
    project = Project(name="p", classes=["a", "b"], created_at=time.time(),
                      training=TrainOptions(stop="epochs:3", holdout="test", lr=0.05, augment=False))
    config = train_config(project, has_test=True)
    assert (config.stop, config.holdout, config.lr, config.augment) == ("epochs:3", "test", 0.05, False)
    assert train_config(project, has_test=False).holdout == "labeled"


_REPORT_PRIORITY = """
import os, sys
from alpipe.pipeline import AUTOGROUP, lower_cpu_priority

def group_nice():
    # "/autogroup-85 nice 0"; empty for the sessions of init's default group (as under a CI runner)
    return (AUTOGROUP.read_text().split() or ["default"])[-1]

before = group_nice()
lowered = lower_cpu_priority(int(sys.argv[1]))
print(lowered, os.nice(0), before, group_nice())
"""


def _priority_report(nice: int, *, own_session: bool) -> list[str]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _REPORT_PRIORITY, str(nice)], capture_output=True, text=True,
                         check=True, start_new_session=own_session).stdout
    return out.split()


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="the kernel has no autogroup scheduling")
def test_a_worker_leading_its_session_lowers_its_autogroup_so_nice_counts_against_the_api():
    # `alpipe up` starts each worker in a session of its own: without the autogroup's nice, the
    # scheduler would share the CPU equally between the worker's session and the API's.
    lowered, nice, _, group_nice = _priority_report(10, own_session=True)
    assert (lowered, nice, group_nice) == ("True", "10", "10")


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="the kernel has no autogroup scheduling")
def test_a_worker_in_someone_elses_session_lowers_only_itself():
    lowered, nice, before, group_nice = _priority_report(10, own_session=False)
    assert (lowered, nice, group_nice) == ("False", "10", before)
    lowered, nice, before, group_nice = _priority_report(0, own_session=True)
    assert (lowered, nice, group_nice) == ("False", "0", before)
