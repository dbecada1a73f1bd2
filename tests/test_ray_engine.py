"""``rollout_backend=ray``: Ray rollout workers sample what the in-process engine samples, stay in step with the
trainer through weight syncs, and are replaced when they die.

Each worker is an actor with a ``LocalEngine`` on a copy of the policy built from its config. With a seed per
prompt, what a worker samples depends on the weights and the seed only, so two workers give the in-process
engine's tokens and log-probs exactly (``max_batch = n`` decodes each prompt's samples on their own in both, so
bf16 rounds alike). Ray runs locally with ``ray.init(num_cpus=2)``, started once for the module.
"""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from alignkit.models.loading import LoraSettings, add_lora, load_model  # noqa: E402
from alignkit.rl.engines.ray_engine import RayEngine  # noqa: E402
from alignkit.rl.rollout import LocalEngine, SamplingParams, StaleWeights  # noqa: E402

N = 3  # samples per prompt
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def setup(ray_cluster):
    model, tok = load_model("tiny", seed=0)
    model = add_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # non-zero adapters, so the merged weights differ from the base ones
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    local = LocalEngine(model, tok, precision="bf16", max_batch=N)
    remote = RayEngine(model, tok, workers=2, precision="bf16", max_batch=N)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("hello there", "max(3,7)=", "hi", "a b c d e")]
    yield model, local, remote, prompts
    remote.close()


def _flat(groups):
    return [(c.token_ids, c.logps, c.finish_reason, c.weight_version) for g in groups for c in g]


def _same(local, remote, prompts, seeds=(11, 12, 13, 14), version=None):
    a = local.generate(prompts, N, SAMPLING, seeds=list(seeds), version=version)
    b = remote.generate(prompts, N, SAMPLING, seeds=list(seeds), version=version)
    assert _flat(a) == _flat(b)
    return a


def _step(model, local, remote, version):
    """A training step's worth of change to the adapters, then the sync both engines get."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(version)) * 0.2)
    local.update_weights(model, version=version)
    remote.update_weights(model, version=version)


def test_two_workers_sample_what_the_local_engine_samples_before_and_after_a_sync(setup):
    model, local, remote, prompts = setup
    before = _same(local, remote, prompts, version=remote.version)
    _step(model, local, remote, version=remote.version + 1)
    after = _same(local, remote, prompts, version=remote.version)
    assert _flat(before) != _flat(after), "the step changed nothing: the test would not see a missed sync"
    assert {c.weight_version for g in after for c in g} == {remote.version}
    # LoRA: after the base (once, when a worker starts) a sync carries the adapters alone, in float32
    assert remote.last_sync_bytes == sum(4 * p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_a_sync_writes_every_weight_of_a_zeroed_worker(setup):
    model, local, remote, prompts = setup
    ray.get([w.scramble.remote() for w in remote.workers])
    zeroed = remote.generate(prompts, N, SAMPLING, seeds=[11, 12, 13, 14])
    assert _flat(zeroed) != _flat(local.generate(prompts, N, SAMPLING, seeds=[11, 12, 13, 14]))
    remote.update_weights(model, version=remote.version)
    _same(local, remote, prompts)


def test_a_missed_sync_is_refused(setup):
    model, local, remote, prompts = setup
    with pytest.raises(StaleWeights, match="weight sync was missed"):
        remote.generate(prompts, N, SAMPLING, seeds=[1, 2, 3, 4], version=remote.version + 1)


def test_a_killed_worker_is_replaced_and_its_share_generated_again(setup):
    model, local, remote, prompts = setup
    restarts = remote.restarts
    ray.kill(remote.workers[0], no_restart=True)
    _same(local, remote, prompts, seeds=(5, 6, 7, 8))
    assert remote.restarts == restarts + 1


def test_sleep_frees_the_workers_and_wake_brings_the_current_weights(setup):
    model, local, remote, prompts = setup
    remote.sleep()
    _step(model, local, remote, version=remote.version + 1)  # a sync while asleep: applied at wake()
    remote.wake()
    _same(local, remote, prompts, version=remote.version)
