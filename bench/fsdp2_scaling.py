"""Memory, step time and communication of ``strategy=fsdp2`` on 2 processes against 1 process, same global batch.

Arms (each its own process or torchrun job, interleaved over ``--repeats``), on SmolLM2-135M-Instruct in fp32:

- ``1x2``: one process with 2 torch threads, batch ``2B``;
- ``ddp``: torchrun 2 processes x 1 thread, batch ``B`` each, ``strategy=ddp`` (every process holds everything);
- ``fsdp2``: the same with ``strategy=fsdp2``.

Every arm runs the real recipe (``alignkit.cli``). Inside each process the script records:

- ``load``: anonymous resident memory (``RssAnon``) once the model is loaded, before the loop lays it out. Not
  ``VmRSS``: the weights are loaded from a memory-mapped safetensors file, whose pages count in VmRSS as they
  are read (sharding reads them all) but are page cache, not memory the process holds;
- ``train_peak``: the peak of ``RssAnon`` during the training steps (sampled every 5 ms from the moment the
  loop has laid the model out, so it measures the steps, not the loading: every process still loads the whole
  checkpoint before sharding it);
- ``state``: the bytes of the parameters, gradients and AdamW state this process holds (local shards; the
  arithmetic the resident memory is compared with): parameters and gradients 4 B each, AdamW 8 B a parameter;
- ``comm``: bytes through the collectives per optimizer step (all-gather outputs, reduce-scatter inputs,
  all-reduce tensors), counted by wrapping ``torch.distributed``'s functions;
- the step time: the median ``seconds`` of steps 2..N in metrics.jsonl.

``--method ppo`` runs PPO with all four models (policy, frozen reference, reward model, separate value model)
instead of SFT. Under fsdp2 the policy, the value model, the reference and the reward model are sharded.

    python bench/fsdp2_scaling.py --steps 6 --repeats 2
    python bench/fsdp2_scaling.py --method ppo --steps 3 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss(field: str = "RssAnon") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(report: Path, argv: list[str]) -> None:
    """Run ``alignkit.cli`` with ``argv`` in this process, recording memory and collective traffic."""
    import torch
    import torch.distributed as tdist

    from alignkit.train import strategy

    rank = int(os.environ.get("RANK", "0"))
    rec: dict = {"rank": rank, "comm_bytes": 0, "calls": 0}

    def counting(fn):
        def wrapped(*args, **kwargs):
            # the largest tensor argument: an all-gather's output, a reduce-scatter's input, an all-reduce's tensor
            sizes = [t.numel() * t.element_size() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            rec["comm_bytes"] += max(sizes, default=0)
            rec["calls"] += 1
            return fn(*args, **kwargs)
        return wrapped

    for name in ("all_gather_single", "reduce_scatter_single", "all_reduce", "all_gather_into_tensor",
                 "reduce_scatter_tensor"):
        if hasattr(tdist, name):
            setattr(tdist, name, counting(getattr(tdist, name)))

    prepare = strategy.prepare

    def recording_prepare(model, cfg):
        if "load" not in rec:  # the trainable model, laid out by the loop (other prepares: frozen models)
            rec["load"] = _rss()
        layout = prepare(model, cfg)  # the last call is the loop's, on the trainable model
        rec["after_layout"] = _rss()
        rec["comm_bytes_before_steps"] = rec["comm_bytes"]
        peak["anon"] = _rss()  # the peak of the steps starts from here
        local = 0
        for p in model.parameters():
            if p.requires_grad:
                t = p.to_local() if hasattr(p, "to_local") else p
                local += t.numel()
        rec["state"] = local * 4 * 4  # parameter, gradient, exp_avg, exp_avg_sq in fp32
        return layout

    peak = {"anon": 0}
    done = threading.Event()

    def sample() -> None:  # the kernel keeps no high-water mark of anonymous memory: sample it every 5 ms
        while not done.wait(0.005):
            peak["anon"] = max(peak["anon"], _rss())

    threading.Thread(target=sample, daemon=True).start()
    strategy.prepare = recording_prepare
    from alignkit import cli

    try:
        cli.main(argv)
    finally:
        done.set()
        rec["train_peak"] = peak["anon"]
        rec["comm_bytes_steps"] = rec["comm_bytes"] - rec.get("comm_bytes_before_steps", 0)
        report.write_text(json.dumps(rec))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(arm: str, method: str, steps: int, batch: int, data: Path, tmp: Path) -> dict:
    out = tmp / f"{arm}-{os.urandom(3).hex()}"
    reports = tmp / f"reports-{out.name}"
    reports.mkdir()
    nproc = 1 if arm == "1x2" else 2
    per = batch * (2 if nproc == 1 else 1)
    args = [method, "model=smollm2-135m-instruct", f"data={data}", f"output_dir={out}", f"max_steps={steps}",
            "progress=false", "lr=1e-6", f"strategy={'ddp' if arm == '1x2' else arm}", "max_length=256"]
    if method == "sft":
        args += [f"batch_size={per}"]
    else:  # ppo: per-process prompts, 4 completions each, a reward model as the reward
        args += [f"prompts_per_step={per}", "num_generations=4", "max_new_tokens=16", "batch_size=2",
                 "value_model=separate", f"rewards=rm:{tmp / 'rm'}", "rollout_precision=fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "2" if nproc == 1 else "1", "PYTHONPATH": str(ROOT)}
    me = [str(Path(__file__).resolve()), "--worker", str(reports)]
    if nproc == 1:
        cmd = [sys.executable, *me, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_port()), *me, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(reports.glob("rank-*.json"))]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    if not lines:
        raise SystemExit(f"{arm}: no steps recorded:\n{proc.stderr[-3000:]}")
    step = statistics.median(r["seconds"] for r in lines[1:]) if len(lines) > 1 else lines[0]["seconds"]
    return {"arm": arm, "step_s": step, "ranks": ranks, "steps": len(lines)}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        reports = Path(sys.argv[2])
        worker(reports / f"rank-{os.environ.get('RANK', '0')}.json", sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("sft", "ppo"), default="sft")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="rows (sft) or prompts (ppo) per process of 2")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import _toy

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = _toy.sft_jsonl(tmp, n=64) if args.method == "sft" else _toy.prompt_jsonl(tmp, n=64)
        if args.method == "ppo":  # a reward model to serve as the fourth model (its head is untrained: fine here)
            from alignkit.models.reward import RewardMeta, load_reward_backbone, save_meta

            rm, tok = load_reward_backbone("smollm2-135m-instruct", 1)
            rm.save_pretrained(tmp / "rm")
            tok.save_pretrained(tmp / "rm")
            save_meta(tmp / "rm", RewardMeta())
        results: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for arm in ("1x2", "ddp", "fsdp2"):
                results.setdefault(arm, []).append(run_arm(arm, args.method, args.steps, args.batch, data, tmp))
    mib = 2**20
    print(f"\n{args.method}: SmolLM2-135M-Instruct fp32, global batch {2 * args.batch}, {args.steps} steps, "
          f"{args.repeats} repeat(s); per process (the larger rank), medians over repeats")
    print("| arm | RSS after loading (MiB) | after the layout | training peak RSS | params+grads+AdamW held | comm per step (MiB) | step (s) |")
    print("|---|---|---|---|---|---|---|")
    table = {}
    for arm, runs in results.items():
        def med(key):
            return statistics.median(max(r[key] for r in run["ranks"]) for run in runs)
        row = {"load": med("load") / mib, "laid_out": med("after_layout") / mib, "peak": med("train_peak") / mib, "state": med("state") / mib,
               "comm": statistics.median(max(r["comm_bytes_steps"] for r in run["ranks"]) / run["steps"] for run in runs) / mib,
               "step": statistics.median(run["step_s"] for run in runs)}
        table[arm] = row
        print(f"| {arm} | {row['load']:.0f} | {row['laid_out']:.0f} | {row['peak']:.0f} | {row['state']:.0f} | {row['comm']:.1f} | {row['step']:.2f} |")
    base = table["1x2"]
    for arm in ("ddp", "fsdp2"):
        print(f"{arm} vs 1x2: training peak x{table[arm]['peak'] / base['peak']:.2f}, held state "
              f"x{table[arm]['state'] / base['state']:.2f}, step time x{table[arm]['step'] / base['step']:.2f}")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
