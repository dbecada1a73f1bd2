"""Sharded training (``strategy=fsdp2``) against one process, through the real CLI under torchrun (gloo, 2 CPU
processes, the ``tiny`` model in fp32).

The loop's semantics do not change with the layout: each micro-batch's summed loss over the step's global
normaliser, gradients summed over processes. So 2 processes x batch 4 sharded must take the steps 1 process x
batch 8 takes (losses 1e-6, weights 1e-5 after 3 steps; lr=1e-3 moves the weights ~1e-3, a hundred times that),
and so must 2 processes x batch 4 under ddp. FSDP2 averages gradients unless every unit is told to sum
(``alignkit.train.strategy.shard``): left at its default, the gradient norms below come out halved.

Also: a sharded checkpoint resumes bit for bit, a checkpoint killed mid-write is skipped, the exported final
model loads in transformers with the trained weights' logits, and combinations that cannot work exit 2 before
any model loads.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


import _toy

COMMON = dict(model="tiny", lr=1e-3, adam_eps=1e-6, max_steps=3, progress=False, seed=0)
DATA = {"dpo": "dpo", "rm": "dpo", "gdpo": "gdpo"}  # each method's data set (others: sft)
COMPARED = ("loss", "grad_norm", "lr", "rewards/chosen", "rewards/rejected", "rewards/margin", "accuracy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(method: str, out: Path, nproc: int = 1, timeout: int = 240, **overrides) -> subprocess.CompletedProcess:
    """``alignkit <method>`` with ``nproc`` processes (torchrun, gloo); returns the finished process."""
    args = [method, f"output_dir={out}", *(f"{k}={v}" for k, v in {**COMMON, **overrides}.items())]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
              "127.0.0.1", "--master_port", str(_free_port()), "-m", "alignkit.cli"]
    cmd = launch + args if nproc > 1 else [sys.executable, "-m", "alignkit.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_same(a: Path, b: Path, *, loss_tol: float = 1e-6, weight_tol: float = 1e-5, label: str = "") -> None:
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == 3 and [r["step"] for r in ma] == [r["step"] for r in mb]
    worst: dict[str, float] = {}
    for ra, rb in zip(ma, mb):
        for k in COMPARED:
            if k in ra or k in rb:
                # relative to the value where it exceeds 1 (GDPO's belief likelihood makes its loss ~60 on bytes)
                worst[k] = max(worst.get(k, 0.0), abs(ra[k] - rb[k]) / max(1.0, abs(ra[k])))
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    w = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    print(f"\n[{label}] max |diff|: weights {w:.2e}, " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert worst.get("loss", 0.0) <= loss_tol and all(v <= 1e-5 for v in worst.values()), worst
    assert w <= weight_tol, w


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {"sft": _toy.sft_jsonl(d, n=24), "dpo": _toy.preference_jsonl(d, n=24), "gdpo": _toy.belief_jsonl(d, n=24)}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data):
    """One process x batch 8 for each (method, extra settings), run once."""
    done: dict[tuple, Path] = {}

    def go(method: str, **extra) -> Path:
        key = (method, tuple(sorted(extra.items())))
        if key not in done:
            out = tmp_path_factory.mktemp(method)
            ok(cli(method, out, data=data[DATA.get(method, "sft")], batch_size=8, **extra))
            done[key] = out
        return done[key]

    return go


@pytest.mark.parametrize("method,extra", [
    ("sft", {}),
    ("sft", {"gradient_checkpointing": "true"}),
    ("dpo", {}),
    ("dpo", {"reference": "live"}),  # the frozen reference is sharded too, called inside the policy's pass
    ("dpo", {"lora": "true", "lora_r": 4}),
    ("rm", {}),
    ("gdpo", {}),  # the belief terms' per-row sums are reduced like the pairs'
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_two_sharded_processes_equal_one(tmp_path, data, baseline, method, extra):
    out = tmp_path / "fsdp2"
    ok(cli(method, out, nproc=2, data=data[DATA.get(method, "sft")], batch_size=4,
           strategy="fsdp2", **extra))
    assert_same(baseline(method, **extra), out, label=f"{method} {extra} fsdp2 2x4 vs 1x8")


def test_sharded_equals_ddp(tmp_path, data):
    ddp, fsdp2 = tmp_path / "ddp", tmp_path / "fsdp2"
    ok(cli("sft", ddp, nproc=2, data=data["sft"], batch_size=4, strategy="ddp"))
    ok(cli("sft", fsdp2, nproc=2, data=data["sft"], batch_size=4, strategy="fsdp2", save_steps=1,
           save_total_limit=3))
    assert_same(ddp, fsdp2, label="sft 2 processes: ddp vs fsdp2")

    # the exported final model is a plain transformers directory with the trained weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp2 / "final").eval()
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        got = model(ids).logits
    trained = AutoModelForCausalLM.from_pretrained(ddp / "final").eval()
    with torch.no_grad():
        want = trained(ids).logits
    assert (got - want).abs().max().item() < 1e-5

    # sharded checkpoints: one directory per step with each process's shard and RNG state
    ckpt = fsdp2 / "checkpoints" / "step-00000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["sharded"] and state["world_size"] == 2
    assert {"rng-0.pt", "rng-1.pt", ".metadata"} <= {p.name for p in ckpt.iterdir()}


def test_sharded_resume_is_exact_and_skips_a_torn_checkpoint(tmp_path, data):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = dict(data=data["sft"], batch_size=4, strategy="fsdp2", save_steps=1, save_total_limit=5)
    ok(cli("sft", whole, nproc=2, **common))
    ok(cli("sft", cut, nproc=2, **common))
    # as if the run had been killed while writing step 2's checkpoint: step 2 is a torn temporary directory
    ckpts = cut / "checkpoints"
    shutil.rmtree(cut / "final")
    (ckpts / "step-00000002").rename(ckpts / ".tmp-step-00000002")
    (ckpts / ".tmp-step-00000002" / "state.json").unlink()
    lines = metrics(cut)[:1]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    proc = cli("sft", cut, nproc=2, **common, resume="true")
    ok(proc)
    assert "resumed from step-00000001" in proc.stderr
    assert [r["step"] for r in metrics(cut)] == [1, 2, 3]
    for a, b in zip(metrics(whole), metrics(cut)):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    wa, wb = weights(whole), weights(cut)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run's"


def test_resuming_with_another_world_size_or_strategy_exits_2_before_loading(tmp_path, data):
    out = tmp_path / "run"
    ok(cli("sft", out, nproc=2, data=data["sft"], batch_size=4, strategy="fsdp2", save_steps=1, max_steps=2))
    shutil.rmtree(out / "final")
    # (one process: under torchrun a failing process makes torchrun itself exit 1)
    proc = cli("sft", out, data=data["sft"], batch_size=4, strategy="fsdp2", max_steps=3, resume="true")
    assert proc.returncode == 2 and "shards of 2 processes" in proc.stderr, proc.stderr[-2000:]
    proc = cli("sft", out, data=data["sft"], batch_size=4, strategy="ddp", max_steps=3, resume="true")
    assert proc.returncode == 2 and "strategy='fsdp2' (now 'ddp')" in proc.stderr, proc.stderr[-2000:]
    for proc in (proc,):
        assert "Loading" not in proc.stderr  # refused before any model loads


@pytest.mark.parametrize("overrides,named", [
    ({"strategy": "ddp", "cpu_offload": "true"}, "cpu_offload"),
    ({"strategy": "fsdp2", "compile": "true"}, "compile"),
    ({"strategy": "fsdp2", "cpu_offload": "true", "device": "cpu"}, "cpu_offload"),
])
def test_unsupported_combinations_exit_2_naming_the_keys(tmp_path, data, overrides, named):
    proc = cli("sft", tmp_path / "bad", data=data["sft"], **overrides, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_a_model_without_decoder_layers_cannot_be_sharded():
    from alignkit.errors import ConfigError
    from alignkit.train import strategy

    with pytest.raises(ConfigError, match="strategy=fsdp2.*strategy=ddp"):
        strategy.shard(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---------------------------------------------------------------- online RL, sharded


def _rl_two_sharded(method: str, args: list[str], timeout: float = 180) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "alignkit.cli", method, *args, "strategy=fsdp2"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_sharded_grpo_with_dynamic_sampling_equals_one_process(tmp_path):
    """The rollout engine samples from a whole copy refreshed from the gathered shards; the reference (full
    fine-tuning, KL in the reward) is sharded too; the rollout is the same on both sides, so the steps are."""
    from alignkit.cli import main
    from test_rl_distributed import _args, _write_data, assert_same_rl_run

    data, reward = _write_data(tmp_path, [i % 3 == 0 for i in range(32)])
    settings = dict(preset="dapo", mask_truncated="false", kl_in="reward", kl_estimator="k1", kl_coef=0.05,
                    mini_batches=2, max_steps=4, batch_size=1)
    assert main(["grpo", *_args(data, reward, tmp_path / "one", prompts_per_step=8, **settings)]) == 0
    _rl_two_sharded("grpo", _args(data, reward, tmp_path / "two", prompts_per_step=4, **settings))
    h = assert_same_rl_run(tmp_path / "one", tmp_path / "two", "grpo fsdp2 2 x 4 prompts vs 1 x 8")
    assert sum(r.get("dynamic_sampling/dropped", 0) for r in h) > 0


def test_sharded_grpo_where_one_process_holds_fewer_rows_joins_with_fillers(tmp_path):
    """Rank 1's draws are all flat (zero variance), so the kept groups are rank 0's: 3 per step, dealt 2 and 1
    at one group per micro-batch. Rank 1 runs a weightless filler pass to join rank 0's second micro-batch (a
    sharded forward and backward are collectives): without it the run hangs (the timeout) or fails."""
    from alignkit.cli import main
    from alignkit.rl.sampling import PromptSampler
    from test_rl_distributed import COMMON as RL, _args, _write_data, assert_same_rl_run

    n = 32
    order = PromptSampler(n, seed=RL["seed"])._perm(0)
    flat = [False] * n
    for pos in range(1, n, 2):
        flat[order[pos]] = True
    data, reward = _write_data(tmp_path, flat)
    settings = dict(preset="dapo", mask_truncated="false", max_sampling_rounds=2, max_steps=3, batch_size=1)
    assert main(["grpo", *_args(data, reward, tmp_path / "one", prompts_per_step=4, **settings)]) == 0
    _rl_two_sharded("grpo", _args(data, reward, tmp_path / "two", prompts_per_step=2, **settings), timeout=120)
    h = assert_same_rl_run(tmp_path / "one", tmp_path / "two", "grpo fsdp2, rank 1 all flat")
    assert all(r["dynamic_sampling/kept"] == 3 for r in h)


def test_sharded_ppo_with_a_separate_value_model_equals_one_process(tmp_path):
    """PPO's policy and its separate critic backbone are sharded in one FSDP2 model (the actor-critic), the frozen
    reference on its own; the value head is gathered into final/value_head.pt."""
    from alignkit.cli import main
    from test_rl_distributed import _args, _write_data

    data, reward = _write_data(tmp_path, [False] * 32)
    settings = dict(value_model="separate", max_steps=3, batch_size=1, mini_batches=1, ppo_epochs=1)
    assert main(["ppo", *_args(data, reward, tmp_path / "one", prompts_per_step=4, **settings)]) == 0
    _rl_two_sharded("ppo", _args(data, reward, tmp_path / "two", prompts_per_step=2, **settings))
    # PPO's loss (~2.3, policy plus value loss) is summed in float32 in another order: a few ulps (1e-6 relative)
    ma, mb = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(ma) == len(mb) == 3
    for ra, rb in zip(ma, mb):
        assert ra["reward/mean"] == rb["reward/mean"]
        # the critic's loss is reduced over the two shards in another order: equal to float rounding
        assert abs(ra["value/loss"] - rb["value/loss"]) <= 1e-6 * abs(ra["value/loss"])
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6 * abs(ra["loss"]), (ra["loss"], rb["loss"])
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-5
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    one = torch.load(tmp_path / "one" / "final" / "value_head.pt")
    two = torch.load(tmp_path / "two" / "final" / "value_head.pt")
    assert one.keys() == two.keys() and all((one[k] - two[k]).abs().max() < 1e-5 for k in one)
    assert any(one[k].abs().max() > 0 for k in one), "the value head (zero at the start) has trained"


def _reward_model(directory: Path) -> Path:
    from alignkit.models.reward import RewardMeta, load_reward_backbone, save_meta

    model, tok = load_reward_backbone("tiny", 1, seed=3)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    save_meta(directory, RewardMeta(mean=[0.1], std=[2.0]))
    return directory


SHARDED_RM = """
import json, sys, types
import torch
from torch.distributed.tensor import DTensor
from alignkit.rl.rewards import RewardContext, build_reward_set
from alignkit.train import dist, strategy

path, out = sys.argv[1], sys.argv[2]
dist.init()
cfg = types.SimpleNamespace(strategy="fsdp2", device="cpu", precision="fp32", cpu_offload=False)
rs = build_reward_set(f"rm:{path}", "", RewardContext(place_model=lambda m: strategy.prepare(m, cfg)))
rs.warm_up()
fn = rs.functions[0][1]
assert rs.collective and isinstance(next(fn._scorer.model.parameters()), DTensor)
texts = [" 4", " five", " 2+2 is 4", " I think it is 4.", " no", " 4!", " four", " 3"]
got = []
# rank 0 scores 5 completions (3 batches of 2) while rank 1 scores none, then 1 against 3
for share in ((5, 0), (1, 3)):
    n = share[dist.rank()]
    got.append(rs(["2+2="] * n, texts[:n], {}).per_function["rm"])
json.dump(got, open(f"{out}/rank{dist.rank()}.json", "w"))
"""


def test_a_sharded_reward_model_scores_unequal_shares_as_one_process(tmp_path):
    """``rewards=rm:PATH`` under fsdp2: the reward model is sharded over the processes (DTensor parameters), and
    processes that score different numbers of completions, none included, agree on the number of passes and
    make up the difference with fillers (without that the run hangs: the timeout); the rewards are the
    unsharded model's."""
    from alignkit.rl.rewards import RewardContext, build_reward_set

    path = _reward_model(tmp_path / "rm")
    script = tmp_path / "sharded_rm.py"
    script.write_text(SHARDED_RM)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(path), str(tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    whole = build_reward_set(f"rm:{path}", "", RewardContext(timeout=0))
    texts = [" 4", " five", " 2+2 is 4", " I think it is 4.", " no", " 4!", " four", " 3"]
    assert rank1[0] == [] and len(rank0[0]) == 5
    assert rank0[0] == pytest.approx(whole(["2+2="] * 5, texts[:5], {}).per_function["rm"], abs=1e-6)
    assert rank0[1] == pytest.approx(whole(["2+2="], texts[:1], {}).per_function["rm"], abs=1e-6)
    assert rank1[1] == pytest.approx(whole(["2+2="] * 3, texts[:3], {}).per_function["rm"], abs=1e-6)


@pytest.mark.parametrize("case", ["weighted", "a-process-without-groups"])
def test_sharded_grpo_with_a_reward_model_equals_one_process(tmp_path, case):
    """GRPO rewarded by a reward model (``rm:PATH``) beside a function: 2 sharded processes, each scoring its
    share of the groups with the sharded reward model, take the steps one process takes. In the second case the
    model's weight is 0 and rank 1's first draw is always flat, so dynamic sampling's second round draws one
    prompt, rank 0's: rank 1 has no completion to score and still joins the reward model's passes."""
    from alignkit.cli import main
    from alignkit.rl.sampling import PromptSampler
    from test_rl_distributed import COMMON as RL, _args, _write_data, assert_same_rl_run

    flat = [False] * 32
    settings = dict(max_steps=3, batch_size=1, reward_weights="1,0.5")
    per_process = 2
    if case == "a-process-without-groups":
        for pos in range(1, 32, 2):
            flat[PromptSampler(32, seed=RL["seed"])._perm(0)[pos]] = True
        settings.update(reward_weights="0,1", preset="dapo", mask_truncated="false", max_sampling_rounds=2)
        per_process = 1
    data, reward = _write_data(tmp_path, flat)
    rm = _reward_model(tmp_path / "rm")

    def args(out: str, prompts: int) -> list[str]:
        got = _args(data, reward, tmp_path / out, prompts_per_step=prompts, **settings)
        return [f"rewards=rm:{rm},{reward}:counting" if a.startswith("rewards=") else a for a in got]

    assert main(["grpo", *args("one", 2 * per_process)]) == 0
    _rl_two_sharded("grpo", args("two", per_process), timeout=120)
    h = assert_same_rl_run(tmp_path / "one", tmp_path / "two", f"grpo fsdp2 with rm: ({case})")
    assert all("reward/rm/mean" in r for r in h)
    if case == "a-process-without-groups":
        assert all(r["dynamic_sampling/rounds"] == 2 for r in h), h


@pytest.mark.parametrize("layout", ["ddp", "fsdp2"])
def test_a_process_with_no_rows_in_a_step_joins_the_metrics(tmp_path, layout):
    """One prompt per process and one sampling round: rank 1's group is always flat, so rank 1 holds no row in
    any step. It reports none of the task's metrics, and the loop reduces metrics over the union of the names
    (a tensor per name otherwise: gloo aborts on the size mismatch); under fsdp2 it also joins every pass."""
    from alignkit.rl.sampling import PromptSampler
    from test_rl_distributed import COMMON as RL, _args, _write_data

    order = PromptSampler(32, seed=RL["seed"])._perm(0)
    flat = [False] * 32
    for pos in range(1, 32, 2):
        flat[order[pos]] = True
    data, reward = _write_data(tmp_path, flat)
    args = _args(data, reward, tmp_path / "two", prompts_per_step=1, preset="dapo", mask_truncated="false",
                 max_sampling_rounds=1, max_steps=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "alignkit.cli", "grpo", *args, f"strategy={layout}"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    h = metrics(tmp_path / "two")
    assert [r["step"] for r in h] == [1, 2] and all("loss" in r and r["dynamic_sampling/kept"] == 1 for r in h)
