"""``rollout_backend=ray`` through the GRPO recipe: the run equals the in-process one, even when a rollout
worker is killed mid-run (it is replaced and its share generated again). Ray runs locally with
``ray.init(num_cpus=2)``: one CPU per worker."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import _toy  # noqa: E402
from alignkit.models.loading import load_model  # noqa: E402
from alignkit.rl.engines.ray_engine import RayEngine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _grpo(tmp_path, name, backend, **extra):
    from alignkit.config import RLConfig
    from alignkit.recipes import rl

    reward = tmp_path / "reward.py"
    reward.write_text((ROOT / "tests" / "_toy.py").read_text())  # its max_digit_reward
    settings = dict(model="tiny", data=str(_toy.prompt_jsonl(tmp_path)), rewards=f"{reward}:max_digit_reward",
                    output_dir=str(tmp_path / name), prompts_per_step=4, num_generations=4, max_new_tokens=4,
                    rollout_batch=4, max_steps=3, batch_size=2, lr=1e-3, progress=False, seed=0, overwrite=True,
                    eval_fraction=0, rollout_backend=backend, rollout_workers=2)
    cfg = RLConfig(**{**settings, **extra})
    rl.run(cfg)
    return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_grpo_with_ray_workers_equals_the_in_process_run_even_when_a_worker_dies(tmp_path, ray_cluster, monkeypatch):
    """The same losses, rewards and gradient norms as rollout_backend=local, in a run where a worker is killed
    before the second rollout: it is replaced and its share generated again."""
    local = _grpo(tmp_path, "local", "local")
    real = RayEngine.generate
    calls = {"n": 0}

    def generate(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            ray.kill(self.workers[1], no_restart=True)
        return real(self, *a, **k)

    monkeypatch.setattr(RayEngine, "generate", generate)
    remote = _grpo(tmp_path, "ray", "ray")
    assert calls["n"] >= 3 and len(local) == len(remote) == 3
    n_params = sum(p.numel() for p in load_model("tiny")[0].parameters())
    assert all(r["sync/bytes"] == 2 * n_params for r in remote)  # the whole model in bf16 at every sync
    for a, b in zip(local, remote):
        for k in ("loss", "reward/mean", "grad_norm", "completion/length/mean"):
            assert math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-7), (k, a[k], b[k])


def test_workers_left_with_old_weights_trip_the_mismatch_alarm(tmp_path, ray_cluster, monkeypatch, caplog):
    """Every sync after the first sends the initial weights again, under the new version number (a sync that
    claims to have happened and did not): the workers pass the version check and sample from the initial model,
    and the mismatch alarm warns at every step after the first."""
    import logging

    from alignkit.rl.engines import ray_engine

    real, first = ray_engine.full_weights, {}

    def stale(model, dtype):
        if not first:
            first["w"] = real(model, dtype)
        return first["w"]

    monkeypatch.setattr(ray_engine, "full_weights", stale)
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        h = _grpo(tmp_path, "stale", "ray", lr=3e-2, max_new_tokens=2, seed=1, scheduler="constant", mismatch_alarm=0.05)
    assert h[0]["mismatch/max_abs"] < 0.05 and min(r["mismatch/max_abs"] for r in h[1:]) > 0.05, h
    alarms = [r.getMessage().split(":")[0] for r in caplog.records if "mismatch_alarm=0.05" in r.getMessage()]
    assert alarms == ["step 2", "step 3"], alarms


def test_asynchronous_rollouts_with_ray_workers(tmp_path, ray_cluster):
    """max_staleness=1 with two Ray workers: rollout r + 1 is generated while step r trains; the completions are at
    most one version old, step 1 is the synchronous run's, and the correction weighs the lagged ones."""
    moving = dict(lr=3e-2, max_new_tokens=2, seed=1, scheduler="constant", correction="tis")  # weights move each step
    sync = _grpo(tmp_path, "sync", "ray", **moving)
    lagged = _grpo(tmp_path, "lagged", "ray", max_staleness=1, **moving)
    assert [r["rollout/max_staleness"] for r in lagged] == [0, 1, 1]
    assert lagged[0]["loss"] == sync[0]["loss"] and lagged[0]["reward/mean"] == sync[0]["reward/mean"]
    # the bf16 workers alone put the weights within 1e-2 of 1; one version of lag moves them further
    assert all(abs(r["correction/weight_mean"] - 1) < 1e-2 for r in sync), [r["correction/weight_mean"] for r in sync]
    assert all(abs(r["correction/weight_mean"] - 1) > 1e-2 for r in lagged[1:]), [r["correction/weight_mean"] for r in lagged]
    assert all("time/wait" in r for r in lagged)
