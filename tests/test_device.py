"""Nothing on the wrong device: every method's batches and per-row tensors go where the model computes.

No GPU is needed. ``tests/_fake_device.py`` makes a second device on the CPU: tensors on ``meta`` that hold real
CPU values, so a whole recipe runs there and gives the CPU's numbers, while any operation that meets a plain CPU
tensor (a batch that was not moved, a label tensor made on the CPU, a cached reference log-prob left behind)
fails at once with the operation and the alignkit lines that led to it. Each recipe runs with ``device=meta``
through its real ``run()`` (loading, the work before the loop, the loop with its optimizer and gradient
clipping, held-out evaluation) with only the final save stubbed out, as a tensor that is not on the CPU cannot
be written by safetensors here.

What that proves: the device is taken from the model and every tensor that meets the model's goes there; the
model is placed before the work done outside the loop (DPO's reference pass and its "before" evaluation);
autocast is asked for the model's device type; values kept on rows come back to the CPU.

What it cannot prove (the fake device's limits, see its docstring): anything about a real accelerator's kernels,
numerics, bf16 autocast (recorded here, not applied), FSDP2 over NCCL, memory or speed. ``bench/gpu_check.py``
is the check for those, on a GPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import _toy
from _fake_device import DeviceMix, fake_device, foreach_on_fake_device, is_fake
from alignkit.config import DPOConfig, OnlineDPOConfig, RLConfig, RMConfig, SFTConfig
from alignkit.models.device import model_device, remember, to_device
from alignkit.recipes import dpo, online_dpo, rl, rm, sft
from alignkit.recipes.online_dpo import JudgedPairs
from alignkit.rl import rollout
from alignkit.rl.trainer import Rollouts

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(model="tiny", max_steps=2, batch_size=4, eval_fraction=0.25, progress=False, seed=0, lr=1e-3,
              overwrite=True)


def _write(path: Path, rows: list[dict]) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _aspect_data(d: Path) -> str:
    rows = []
    for i in range(16):
        a, b = i % 10, (i * 7 + 3) % 10
        if a == b:
            b = (b + 1) % 10
        hi, lo = max(a, b), min(a, b)
        rows.append({"prompt": f"n={a},{b}", "chosen": str(hi), "rejected": str(lo),
                     "aspects": {"big": 1, "small": -1} if i % 3 else {"big": 1}})
    return _write(d / "aspects.jsonl", rows)


def _step_data(d: Path) -> str:
    rows = [{"prompt": f"{a}+{b}=?", "steps": [f"{a}+{b}", f"= {a + b + (i % 2)}"], "labels": [True, i % 2 == 0]}
            for i, (a, b) in enumerate((i % 7, i % 5) for i in range(16))]
    return _write(d / "steps.jsonl", rows)


CASES = {
    "sft": (sft, SFTConfig, "sft", dict(packing=False)),
    "sft-packed": (sft, SFTConfig, "sft", dict(packing=True)),
    "dpo-cached-lora": (dpo, DPOConfig, "preference", dict(lora=True)),
    "dpo-cached-full-unshared": (dpo, DPOConfig, "preference", dict(share_prompt=False)),
    "dpo-live-full": (dpo, DPOConfig, "preference", dict(reference="live")),
    "dpo-live-lora": (dpo, DPOConfig, "preference", dict(reference="live", lora=True)),
    "kto": (dpo, DPOConfig, "unpaired", dict(loss="kto")),
    "simpo": (dpo, DPOConfig, "preference", dict(loss="simpo")),  # no reference at all
    "rm": (rm, RMConfig, "preference", {}),
    "rm-aspects-unshared-lora": (rm, RMConfig, "aspects", dict(aspects="big,small", share_prompt=False, lora=True)),
    "prm": (rm, RMConfig, "steps", dict(process=True)),
}


def _data(kind: str, d: Path) -> str:
    return str({"sft": _toy.sft_jsonl, "preference": _toy.preference_jsonl, "unpaired": _toy.unpaired_jsonl,
                "aspects": _aspect_data, "steps": _step_data}[kind](d))


def _run(module, cfg, monkeypatch, seen: dict, run=None):
    """``module.run(cfg)`` (or ``run(cfg)``) with the final save stubbed, recording what ``train`` is given."""
    real_train = module.train

    def train(task, model, rows, cfg_, **kw):
        seen["placed"] = model_device(model)
        seen["rows"] = rows
        seen["ops_before_loop"] = seen["checks"].ops_on_device if "checks" in seen else None
        return real_train(task, model, rows, cfg_, **kw)

    monkeypatch.setattr(module, "train", train)
    if module is rm:
        monkeypatch.setattr(rm, "save", lambda model, tok, meta, out, merge=True: seen.update(meta=meta))
    else:
        monkeypatch.setattr(module, "save_final", lambda *a, **k: None)
    return (run or module.run)(cfg)


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_keeps_every_tensor_on_the_model_device(case, tmp_path, monkeypatch):
    module, cls, kind, extra = CASES[case]
    foreach_on_fake_device(monkeypatch)
    cfg = cls(data=_data(kind, tmp_path), output_dir=str(tmp_path / "out"), device="meta", precision="bf16",
              **COMMON, **extra)
    seen: dict = {}
    with fake_device() as checks:
        seen["checks"] = checks
        summary = _run(module, cfg, monkeypatch, seen)
    assert seen["placed"].type == "meta", "the model was not on its device when the loop began"
    assert checks.autocast_devices and set(checks.autocast_devices) == {"meta"}, checks.autocast_devices
    if module is dpo and cfg.eval_fraction > 0:  # the reference pass and the "before" evaluation ran there
        assert seen["ops_before_loop"] > 0
    if module is dpo and cfg.reference == "cached" and cfg.loss != "simpo":
        refs = [r.extra["ref"] for r in seen["rows"]]
        assert refs and all(not is_fake(t) and t.device.type == "cpu" for t in refs), "kept values must be on the CPU"
    if module is rm and not cfg.process:
        assert all(math.isfinite(x) for x in seen["meta"].mean + seen["meta"].std)
    last = summary.get("train_last", summary.get("train", summary))
    assert math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])


RL_CASES = {
    # KL to the policy with its adapters off; the engine's bf16 copy generates on the device
    "grpo-lora": (rl, RLConfig, dict(preset="grpo", lora=True)),
    # a frozen reference model for the KL; the fp32 engine generates with the training model itself
    "grpo-full-fp32-rollout": (rl, RLConfig, dict(preset="grpo", rollout_precision="fp32")),
    # a separate critic, its values and returns, two epochs over the rollout (behaviour log-probs kept on rows)
    "ppo-separate-critic": (rl, RLConfig, dict(preset="ppo", value_model="separate", ppo_epochs=2)),
    "online-dpo": (online_dpo, OnlineDPOConfig, {}),
}


@pytest.mark.parametrize("case", list(RL_CASES))
def test_online_recipe_keeps_every_tensor_on_the_model_device(case, tmp_path, monkeypatch):
    """Online RL on the fake device: generation, rewards, the scoring passes (behaviour, values, reference), the
    advantages and the policy loss. Values kept on rollout rows between steps rest on the CPU; the CPU-only
    lean decode step is not used on another device."""
    module, cls, extra = RL_CASES[case]
    foreach_on_fake_device(monkeypatch)
    reward = tmp_path / "reward.py"
    reward.write_text((ROOT / "tests" / "_toy.py").read_text())
    cfg = cls(data=str(_toy.prompt_jsonl(tmp_path)), rewards=f"{reward}:max_digit_reward",
              output_dir=str(tmp_path / "out"), device="meta", precision="bf16", prompts_per_step=4,
              num_generations=2, max_new_tokens=4, **{**COMMON, "batch_size": 2}, **extra)

    def no_lean_decode(model):
        raise AssertionError("the CPU's lean decode step ran on another device")

    monkeypatch.setattr(rollout, "fast_decoder", no_lean_decode)
    monkeypatch.setattr(rl.torch, "save", lambda *a, **k: None)  # PPO's value head: a fake tensor is not written
    given: list = []  # every row a step source hands the loop
    for source in (Rollouts, JudgedPairs):
        def rows(self, step, model, _real=source.rows):
            out = _real(self, step, model)
            given.extend(out)
            return out

        monkeypatch.setattr(source, "rows", rows)
    seen: dict = {}
    with fake_device() as checks:
        seen["checks"] = checks
        summary = _run(rl, cfg, monkeypatch, seen, run=module.run)
    assert seen["placed"].type == "meta", "the policy was not on its device when the loop began"
    assert checks.autocast_devices and set(checks.autocast_devices) == {"meta"}, checks.autocast_devices
    assert seen["ops_before_loop"] > 0  # the held-out evaluation generated there
    kept = [t for r in given for t in r.extra.values() if isinstance(t, torch.Tensor)]
    assert kept and all(not is_fake(t) and t.device.type == "cpu" for t in kept), "kept values must be on the CPU"
    assert summary["steps"] == cfg.max_steps and math.isfinite(summary["loss"]) and math.isfinite(summary["grad_norm"])


def test_fake_device_computes_what_the_cpu_computes(tmp_path, monkeypatch):
    """The check is only worth having if a run on the fake device is the run on the CPU. It is, up to kernel choice:
    torch's SDPA takes its math kernel on a device it has no fused kernel for, so the first loss is the CPU's bit
    for bit and the gradients differ from the CPU flash kernel's in the 7th digit (with eager attention they are
    equal too)."""
    foreach_on_fake_device(monkeypatch)
    data = _toy.sft_jsonl(tmp_path)
    got = {}
    for dev in ("cpu", "meta"):
        cfg = SFTConfig(data=str(data), output_dir=str(tmp_path / dev), device=dev, **COMMON)
        seen: dict = {}
        with fake_device() if dev == "meta" else _nothing():
            _run(sft, cfg, monkeypatch, seen)
        got[dev] = [(r["loss"], r["grad_norm"]) for r in _metrics(tmp_path / dev)]
        monkeypatch.undo()
        foreach_on_fake_device(monkeypatch)
    assert len(got["cpu"]) == len(got["meta"]) == 2 and got["cpu"][0][0] == got["meta"][0][0]
    for c, m in zip(got["cpu"], got["meta"]):
        assert c == pytest.approx(m, rel=1e-5)


def test_a_forgotten_move_is_caught(tmp_path, monkeypatch):
    """Without the move to the model's device (as before this check existed) the SFT loss fails on the first op."""
    foreach_on_fake_device(monkeypatch)
    monkeypatch.setattr(sft, "on_model", lambda batch, model: batch)
    cfg = SFTConfig(data=str(_toy.sft_jsonl(tmp_path)), output_dir=str(tmp_path / "o"), device="meta", **COMMON)
    with pytest.raises(DeviceMix, match="embedding"), fake_device():
        _run(sft, cfg, monkeypatch, {})


def test_cpu_labels_are_caught(tmp_path, monkeypatch):
    """A per-row tensor made on the CPU (here KTO's labels) meeting the model's log-probs is caught too."""
    foreach_on_fake_device(monkeypatch)
    real = torch.tensor

    def cpu_tensor(data, *a, **kw):  # what the code did before: torch.tensor(labels) with no device
        kw.pop("device", None)
        return real(data, *a, **kw)

    cfg = DPOConfig(data=str(_toy.unpaired_jsonl(tmp_path)), output_dir=str(tmp_path / "o"), device="meta",
                    loss="kto", **COMMON)
    monkeypatch.setattr(dpo.torch, "tensor", cpu_tensor)
    with pytest.raises(DeviceMix), fake_device():
        _run(dpo, cfg, monkeypatch, {})


def test_a_generator_of_the_wrong_device_is_caught():
    """A CPU generator drawing on the model's device (or the reverse) fails as on CUDA; one made for the device
    draws there, seeded as on the CPU."""
    with fake_device():
        on_device = torch.Generator(device="meta").manual_seed(3)
        x = torch.rand(4, dtype=torch.float64, device="meta", generator=on_device)
        assert is_fake(x) and torch.equal(x.cpu(), torch.rand(4, dtype=torch.float64, generator=_cpu_gen(3)))
        with pytest.raises(DeviceMix, match="made for cpu draws on the model device"):
            torch.rand(4, device="meta", generator=torch.Generator().manual_seed(3))
        with pytest.raises(DeviceMix, match="made for meta draws on the CPU"):
            torch.randperm(4, generator=torch.Generator(device="meta"))
        with pytest.raises(DeviceMix):
            torch.multinomial(torch.ones(2, 3).to("meta"), 1, generator=torch.Generator().manual_seed(0))


def _cpu_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_reward_scorer_scores_on_the_model_device():
    """``RewardScorer`` (``rm:PATH`` rewards, evaluation) moves its batches to the reward model's device and hands
    the rewards back on the CPU, the CPU's up to SDPA's kernel choice."""
    from alignkit.models.reward import RewardMeta, RewardScorer, load_reward_backbone

    model, tok = load_reward_backbone("tiny", 2, seed=0)
    meta = RewardMeta(aspects=["a", "b"], weights=[1.0, 0.5], mean=[0.1, -0.2], std=[2.0, 1.0])
    scorer = RewardScorer(model, tok, meta, batch_size=2)
    prompts, responses = ["1+1=", "2+2=", "3+3="], [" 2", " four", " 6, I think"]
    steps = [["2", "so 2"], ["4"], ["6", "checked", "done"]]
    want = scorer.score(prompts, responses), scorer.score_steps(prompts, steps)
    with fake_device():
        model.to("meta")
        got = scorer.score(prompts, responses), scorer.score_steps(prompts, steps)
    assert not is_fake(got[0]) and got[0].device.type == "cpu"
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)  # SDPA's kernel differs (see above)
    for (p_got, agg_got), (p_want, agg_want) in zip(got[1], want[1]):
        assert p_got == pytest.approx(p_want, rel=1e-5) and agg_got == pytest.approx(agg_want, rel=1e-5)


def test_model_device_reads_the_model():
    from alignkit.models.loading import LoraSettings, add_lora, tiny_model
    from alignkit.rl.trainer import ActorCritic, ValueHead

    model = tiny_model()
    assert model_device(model) == torch.device("cpu")
    lora = add_lora(tiny_model(), LoraSettings(r=2))
    assert model_device(lora) == torch.device("cpu")
    ac = ActorCritic(model, ValueHead(64))
    assert model_device(ac) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters: the CPU
    with fake_device():
        lora.to("meta")
        assert model_device(lora).type == "meta" and model_device(lora.get_base_model()).type == "meta"
    # remembered (FSDP2 with CPU offload): the compute device wins over where the parameters rest
    remember(ac, torch.device("meta"))
    assert model_device(ac).type == "meta" and model_device(ac.policy.model.layers[0]).type == "meta"
    assert model_device(tiny_model()) == torch.device("cpu")


def test_to_device_walks_containers():
    gather, take = torch.zeros(2, 3, dtype=torch.long), torch.arange(4)
    with fake_device():
        out = to_device({"ids": torch.ones(2, 3), "layout": (gather, take), "n": 4, "xs": [torch.zeros(1)]}, "meta")
    assert is_fake(out["ids"]) and isinstance(out["layout"], tuple) and all(map(is_fake, out["layout"]))
    assert out["n"] == 4 and is_fake(out["xs"][0])


def test_sharded_model_device_is_the_shards_device(tmp_path):
    """FSDP2 (world size 1, gloo): parameters are DTensors; the model's device is its shards' and it is recorded
    for every module, so the policy inside a sharded actor-critic answers too."""
    code = textwrap.dedent("""
        import torch
        from torch.distributed.tensor import DTensor
        from alignkit.models.device import model_device
        from alignkit.models.loading import tiny_model
        from alignkit.rl.trainer import ActorCritic, ValueHead
        from alignkit.train import strategy
        ac = ActorCritic(tiny_model(), ValueHead(64))
        strategy.shard(ac)
        assert isinstance(next(ac.parameters()), DTensor)
        assert model_device(ac) == torch.device("cpu") == model_device(ac.policy), model_device(ac)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_imports_without_datasets_or_gguf(tmp_path):
    """The GPU machine has no ``datasets`` and no ``gguf``: every alignkit module imports without them and an SFT
    run on local files works (they are imported only where a hub dataset or a .gguf file is asked for)."""
    data = _toy.sft_jsonl(tmp_path)
    code = textwrap.dedent(f"""
        import sys, importlib, pkgutil, runpy
        for name in ("datasets", "gguf"):
            sys.modules[name] = None  # 'import datasets' now raises ImportError
        import alignkit
        for m in pkgutil.walk_packages(alignkit.__path__, "alignkit."):
            importlib.import_module(m.name)
        sys.argv = ["alignkit", "sft", "model=tiny", "data={data}", "output_dir={tmp_path / 'o'}", "max_steps=1",
                    "batch_size=4", "progress=false"]
        try:
            runpy.run_module("alignkit.cli", run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    assert (tmp_path / "o" / "final").is_dir()


def _metrics(out: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
