"""``alignkit feedback``: create a project, add annotators, import items, serve the app, export, show stats.

    alignkit feedback init fb.sqlite --project helpful --kind pairwise --overlap 3
    alignkit feedback annotator fb.sqlite alice            # prints alice's token (shown once)
    alignkit feedback annotator fb.sqlite boss --admin
    alignkit feedback import fb.sqlite helpful items.jsonl
    alignkit feedback generate store=fb.sqlite project=helpful data=prompts.jsonl models=a,b responses=2
    alignkit feedback serve fb.sqlite --port 8000 [--model a=MODEL --model b=MODEL]   # arena models
    alignkit feedback stats fb.sqlite helpful
    alignkit feedback export fb.sqlite helpful --format pairs --out pairs.jsonl --min-annotator-agreement 0.6
    alignkit feedback loop data=prompts.jsonl store=fb.sqlite ...   # the same as `alignkit loop` (its --help)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alignkit.errors import UserError


def _parser() -> argparse.ArgumentParser:
    from alignkit.feedback.export import FORMATS
    from alignkit.feedback.store import KINDS

    parser = argparse.ArgumentParser(prog="alignkit feedback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("init", help="create the store (if new) and a project in it")
    p.add_argument("db")
    p.add_argument("--project", required=True)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--overlap", type=int, default=3, help="distinct annotators per item")
    p.add_argument("--lease-seconds", type=float, default=600.0, help="how long a task is held before re-queued")
    p.add_argument("--gold-rate", type=float, default=0.1, help="share of tasks drawn from gold items")
    p.add_argument("--instructions", default="")
    p = sub.add_parser("annotator", help="add an annotator (or --admin) and print their token")
    p.add_argument("db")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true")
    p = sub.add_parser("import", help="add items from a JSONL/JSON/CSV/Parquet file")
    p.add_argument("db")
    p.add_argument("project")
    p.add_argument("file")
    p = sub.add_parser("serve", help="run the web app")
    p.add_argument("db")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", action="append", default=[], metavar="NAME=MODEL",
                   help="an arena model: a local model (path or alignkit name) or URL#MODEL for an "
                        "OpenAI-compatible endpoint; give two or more")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-body", type=int, default=65_536, help="largest request body in bytes")
    p = sub.add_parser("stats", help="counts, agreement, annotators and ratings as JSON")
    p.add_argument("db")
    p.add_argument("project")
    p = sub.add_parser("export", help="write training rows with provenance")
    p.add_argument("db")
    p.add_argument("project")
    p.add_argument("--format", choices=FORMATS, default="pairs")
    p.add_argument("--out", required=True)
    p.add_argument("--min-annotator-agreement", type=float, help="drop annotators below this agreement with the consensus")
    p.add_argument("--gold-min-accuracy", type=float, help="drop annotators below this accuracy on gold items")
    p.add_argument("--min-item-agreement", type=float, help="then drop items whose judgements agree less than this")
    p.add_argument("--include-gold", action="store_true")
    return parser


def _existing(db: str):
    from alignkit.feedback.store import SQLiteStore

    if not Path(db).exists():
        raise UserError(f"{db}: no such store; create it with `alignkit feedback init {db} --project NAME --kind KIND`")
    return SQLiteStore(db)


def main(argv: list[str]) -> int:
    from alignkit.feedback.store import FeedbackError, SQLiteStore

    if argv[:1] in (["loop"], ["generate"]):  # recipes with key=value settings (`alignkit loop`)
        from alignkit.cli import _method

        return _method("loop" if argv[0] == "loop" else "feedback-generate", argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.action == "init":
            p = SQLiteStore(args.db).create_project(args.project, args.kind, overlap=args.overlap,
                                                    lease_seconds=args.lease_seconds, gold_rate=args.gold_rate,
                                                    instructions=args.instructions)
            print(json.dumps(p))
        elif args.action == "annotator":
            print(_existing(args.db).add_annotator(args.name, "admin" if args.admin else "annotator"))
        elif args.action == "import":
            ids = _existing(args.db).import_file(args.project, args.file)
            print(f"imported {len(ids)} items into {args.project}")
        elif args.action == "stats":
            from alignkit.feedback.report import project_stats

            print(json.dumps(project_stats(_existing(args.db), args.project), indent=2))
        elif args.action == "export":
            from alignkit.feedback.export import export_rows

            rows = export_rows(_existing(args.db), args.project, args.format, include_gold=args.include_gold,
                               min_annotator_agreement=args.min_annotator_agreement,
                               gold_min_accuracy=args.gold_min_accuracy, min_item_agreement=args.min_item_agreement)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
            print(f"wrote {len(rows)} {args.format} rows to {args.out}")
        else:
            return serve(args)
    except FeedbackError as exc:
        raise UserError(str(exc)) from None
    return 0


def serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UserError("the feedback app needs its extra: pip install 'alignkit[feedback]'") from None
    from alignkit.feedback.app import create_app

    store = _existing(args.db)
    responders = dict(_responder(spec, args.max_new_tokens) for spec in args.model)
    app = create_app(store, responders=responders, max_body=args.max_body)
    print(f"alignkit feedback: http://{args.host}:{args.port}/ (admin: /admin)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _responder(spec: str, max_new_tokens: int):
    """``NAME=MODEL``: a chat function for the arena from a local model or ``URL#MODEL`` (OpenAI-compatible)."""
    name, sep, model = spec.partition("=")
    if not sep or not name or not model:
        raise UserError(f"--model {spec!r}: expected NAME=MODEL")
    from alignkit.feedback.lm import EndpointChatLM, LocalChatLM
    from alignkit.rl.rollout import SamplingParams

    if model.startswith(("http://", "https://")):
        url, _, served = model.partition("#")
        lm = EndpointChatLM(url, served or name, name=name)
    else:
        from alignkit.models.loading import load_model

        m, tok = load_model(model)
        m.eval()
        lm = LocalChatLM(m, tok, name=name)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7)
    counter = iter(range(1 << 62))
    return name, lambda messages: lm.chat([messages], sampling, [next(counter)])[0]
