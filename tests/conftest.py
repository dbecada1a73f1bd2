"""Tests run tiny models, whose small ops are fastest on one thread (and do not fight over the 2 cores of CI)."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses (CLI runs, torchrun) inherit it
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with 2 CPUs (one per rollout worker) for a test module, its workers at niceness 0 as alignkit
    asks when it starts Ray itself."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
