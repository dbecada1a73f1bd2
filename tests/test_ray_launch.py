"""``learners=N``: the training processes placed by Ray (:mod:`alignkit.train.ray_launch`) are the processes
torchrun would start: two Ray learners with ``prompts_per_step=4`` run the one-process GRPO run with 8, step for
step (as two torchrun processes do: ``tests/test_rl_distributed.py``), and a learner's error ends the run with
the exit code a one-process run gives. Ray runs locally with ``ray.init(num_cpus=2)``: one CPU per learner."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from alignkit.cli import main  # noqa: E402
from alignkit.train.ray_launch import rendezvous  # noqa: E402
from test_rl_distributed import _args, _write_data, assert_same_rl_run  # noqa: E402


def test_rendezvous_numbers_the_learners_as_torchrun_does():
    envs = rendezvous(["10.0.0.1", "10.0.0.2", "10.0.0.1"], 29500)
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "0", "1"]
    assert [e["LOCAL_WORLD_SIZE"] for e in envs] == ["2", "1", "2"]
    assert {e["MASTER_ADDR"] for e in envs} == {"10.0.0.1"} and {e["WORLD_SIZE"] for e in envs} == {"3"}
    assert {e["MASTER_PORT"] for e in envs} == {"29500"}


def test_two_ray_learners_equal_one_process(tmp_path, ray_cluster):
    data, reward = _write_data(tmp_path, [i % 3 == 0 for i in range(32)])
    settings = dict(preset="dapo", mask_truncated="false", max_steps=3, batch_size=1)
    one = tmp_path / "one"
    assert main(["grpo", *_args(data, reward, one, prompts_per_step=8, **settings)]) == 0
    two = tmp_path / "two"
    assert main(["grpo", *_args(data, reward, two, prompts_per_step=4, learners=2, **settings)]) == 0
    assert_same_rl_run(one, two, "grpo, 2 Ray learners x 4 prompts vs 1 x 8")


def test_a_learner_error_exits_as_one_process_would(tmp_path, ray_cluster, capsys):
    """A data file with a broken line: each learner stops before loading a model (exit 2, naming the file and
    the line), and the driver exits 2 with that message."""
    data, reward = _write_data(tmp_path, [False] * 8)
    data.write_text(data.read_text() + "{not json\n")
    rc = main(["grpo", *_args(data, reward, tmp_path / "bad", prompts_per_step=4, learners=2, max_steps=1)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:9" in err, err


def test_more_learners_than_the_cluster_holds_exits_2(tmp_path, ray_cluster, capsys):
    data, reward = _write_data(tmp_path, [False] * 8)
    rc = main(["grpo", *_args(data, reward, tmp_path / "big", prompts_per_step=4, learners=3, max_steps=1,
                              placement_timeout=3)])
    assert rc == 2 and "could not reserve 3 bundles" in capsys.readouterr().err


def test_ray_rollouts_or_async_with_several_learners_are_refused_before_ray_starts(tmp_path, capsys):
    data, reward = _write_data(tmp_path, [False] * 8)
    for extra in (dict(rollout_backend="ray"), dict(max_staleness=1, correction="tis")):
        rc = main(["grpo", *_args(data, reward, tmp_path / "x", prompts_per_step=4, learners=2, max_steps=1, **extra)])
        assert rc == 2 and "need one training process" in capsys.readouterr().err
