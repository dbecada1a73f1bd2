"""The feedback app under load, on loopback: concurrent annotators against ``alignkit feedback serve``, and a
SIGKILL of the server in the middle of it.

Each annotator is a thread with its own keep-alive HTTP connection. Until the time is up it asks for the next task,
abandons it at ``--abandon-rate`` (walks away without answering: the lease has to expire and re-queue) and
otherwise answers it with a fresh ``client_id``. On a network error or a 5xx it sends the same answer with the same
``client_id`` again, as the page does, until it is acknowledged or the run ends. Every sent ``client_id``, every
acknowledgement (``client_id`` -> vote id) and every refusal (409) is recorded, with the latency of each request
(``next`` and ``answer`` apart).

With ``--kill-after S`` the server is SIGKILLed S seconds into the run and restarted on the same store and port;
the clients' retries land on the restarted server. :func:`audit` then checks the store against what the clients
saw: no acknowledged vote lost, none stored twice, none stored that was refused or never sent, no item over its
overlap, nobody judging an item twice, and SQLite's ``PRAGMA integrity_check``.

    python bench/feedback_load.py                        # 50 annotators, 400 items, overlap 3, 8 s
    python bench/feedback_load.py --kill-after 3         # SIGKILL 3 s in, restart, continue

Prints a JSON summary (and writes it to ``--out``); exits 1 when the audit finds a problem.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from _feedback_server import Server  # noqa: E402

from alignkit.feedback.store import PAIR_CHOICES, SQLiteStore  # noqa: E402

IDLE_POLL = 0.25  # seconds between asks when nothing is left for an annotator (an abandoned lease may come back)
RETRY_PAUSE = 0.1  # seconds before sending again after a network error or a 5xx


def percentiles(samples: list[float]) -> dict:
    """p50/p95/p99 (nearest rank) and the largest, in milliseconds."""
    if not samples:
        return {"n": 0}
    xs = sorted(samples)

    def rank(q: float) -> float:
        return round(1000 * xs[min(len(xs) - 1, max(0, int(round(q * len(xs))) - 1))], 2)

    return {"n": len(xs), "p50_ms": rank(0.50), "p95_ms": rank(0.95), "p99_ms": rank(0.99),
            "max_ms": round(1000 * xs[-1], 2)}


class _Annotator(threading.Thread):
    """One annotator's loop; everything it saw is kept on the object and merged by :func:`run_load`."""

    def __init__(self, index: int, url: str, token: str, project: str, deadline: float, abandon_rate: float,
                 abandon_until: float, seed: int, timeout: float):
        super().__init__(daemon=True)
        parts = urlsplit(url)
        self.index, self.token, self.project, self.deadline = index, token, project, deadline
        self.abandon_rate, self.abandon_until, self.timeout = abandon_rate, abandon_until, timeout
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.rng = random.Random(seed * 100_003 + index)
        self.latency: dict[str, list[float]] = {"next": [], "answer": []}
        self.statuses: dict[str, dict[int, int]] = {"next": {}, "answer": {}}
        self.network_errors = 0
        self.duplicates = 0
        self.sent: list[str] = []
        self.acked: dict[str, int] = {}
        self.acked_at: dict[str, float] = {}
        self.refused: list[str] = []
        self.abandoned: list[dict] = []

    def post(self, kind: str, path: str, payload: dict) -> tuple[int, dict] | None:
        """One request; None on a network error (the connection is then reopened by the next request)."""
        body = json.dumps(payload).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        t0 = time.perf_counter()
        try:
            self.conn.request("POST", path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.network_errors += 1
            return None
        self.latency[kind].append(time.perf_counter() - t0)
        self.statuses[kind][response.status] = self.statuses[kind].get(response.status, 0) + 1
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, {}

    def until_answered(self, kind: str, path: str, payload: dict) -> tuple[int, dict] | None:
        """Send until a response other than a 5xx comes, or the run ends (None)."""
        while True:
            got = self.post(kind, path, payload)
            if got is not None and got[0] < 500:
                return got
            if time.time() >= self.deadline:
                return None
            time.sleep(RETRY_PAUSE)

    def run(self) -> None:
        try:
            while time.time() < self.deadline:
                got = self.until_answered("next", f"/api/projects/{self.project}/next", {})
                if got is None:
                    break
                status, data = got
                task = data.get("task") if status == 200 else None
                if task is None:
                    time.sleep(IDLE_POLL * (0.5 + self.rng.random()))
                    continue
                if self.rng.random() < self.abandon_rate and time.time() < self.abandon_until:
                    self.abandoned.append({"annotator": self.index, "item": task["item"], "lease": task["lease"]})
                    # away until the lease expires (asking earlier would give back the lease still held)
                    time.sleep(max(0.0, min(task["expires"], self.deadline) - time.time()) + 0.05)
                    continue
                self.answer(task)
        finally:
            self.conn.close()

    def answer(self, task: dict) -> None:
        client_id = uuid.uuid4().hex
        payload = {"answer": {"choice": self.rng.choice(PAIR_CHOICES)}, "client_id": client_id}
        self.sent.append(client_id)
        got = self.until_answered("answer", f"/api/tasks/{task['lease']}/answer", payload)
        if got is None:
            return  # unresolved: the run ended before the server answered
        status, data = got
        if status == 200:
            self.acked[client_id] = data["vote"]
            self.acked_at[client_id] = time.time()
            self.duplicates += bool(data.get("duplicate"))  # stored by an earlier send whose answer was lost
        elif status == 409:
            self.refused.append(client_id)


def run_load(url: str, tokens: list[str], project: str, seconds: float, abandon_rate: float, seed: int,
             kill_after: float | None = None, *, server: Server | None = None, abandon_for: float | None = None,
             timeout: float = 30.0) -> dict:
    """Run ``len(tokens)`` annotators against the app at ``url`` for ``seconds``; with ``kill_after``, SIGKILL
    ``server`` that many seconds in and restart it. Annotators abandon tasks only in the first ``abandon_for``
    seconds (all the run by default). A request under way when the time is up is finished; retries are not.

    Returns ``sent`` (client ids), ``acked`` (client id -> vote id), ``refused`` (409s), ``unresolved`` (sent,
    neither acknowledged nor refused), ``abandoned`` (annotator index, item, lease) and ``summary`` (JSON-able
    counts, throughput and latency percentiles)."""
    if kill_after is not None and server is None:
        raise ValueError("kill_after needs the server to kill")
    start = time.time()
    deadline = start + seconds
    abandon_until = start + (seconds if abandon_for is None else abandon_for)
    workers = [_Annotator(i, url, token, project, deadline, abandon_rate, abandon_until, seed, timeout)
               for i, token in enumerate(tokens)]
    for w in workers:
        w.start()
    kill: dict = {}
    if kill_after is not None:
        time.sleep(max(0.0, start + kill_after - time.time()))
        kill["killed_at_s"] = round(time.time() - start, 3)
        server.kill()
        t0 = time.time()
        server.start()
        kill["restarted_at_s"] = round(time.time() - start, 3)
        kill["down_s"] = round(time.time() - t0, 3)
    for w in workers:
        w.join()
    elapsed = time.time() - start

    acked = {k: v for w in workers for k, v in w.acked.items()}
    refused = [c for w in workers for c in w.refused]
    sent = [c for w in workers for c in w.sent]
    unresolved = sorted(set(sent) - set(acked) - set(refused))
    last_ack = max((t for w in workers for t in w.acked_at.values()), default=start)
    statuses = {kind: {} for kind in ("next", "answer")}
    for w in workers:
        for kind, counts in w.statuses.items():
            for status, n in counts.items():
                statuses[kind][str(status)] = statuses[kind].get(str(status), 0) + n
    summary = {
        "annotators": len(tokens), "seconds": round(elapsed, 2), "abandon_rate": abandon_rate,
        "sent": len(sent), "acked": len(acked), "refused": len(refused), "unresolved": len(unresolved),
        "duplicate_acks": sum(w.duplicates for w in workers),
        "abandoned": sum(len(w.abandoned) for w in workers),
        "network_errors": sum(w.network_errors for w in workers),
        "server_errors": sum(n for counts in statuses.values() for s, n in counts.items() if int(s) >= 500),
        "statuses": statuses,
        "last_ack_s": round(last_ack - start, 2),
        "votes_per_s": round(len(acked) / max(last_ack - start, 1e-9), 1),  # until the last acknowledgement
        "requests_per_s": round(sum(len(w.latency[k]) for w in workers for k in w.latency) / elapsed, 1),
        "latency": {k: percentiles([x for w in workers for x in w.latency[k]]) for k in ("next", "answer")},
    }
    if kill:
        killed = start + kill["killed_at_s"]
        times = [t for w in workers for t in w.acked_at.values()]
        summary["kill"] = {**kill, "acked_before_kill": sum(t < killed for t in times),
                           "acked_after_kill": sum(t >= killed for t in times)}
    return {"sent": sent, "acked": acked, "refused": refused, "unresolved": unresolved,
            "abandoned": [a for w in workers for a in w.abandoned], "summary": summary}


def audit(db: str | Path, project: str, result: dict) -> dict:
    """Check the store against what the clients saw (run it once the server is stopped). Every list in the
    answer is empty, and ``integrity`` is ``"ok"``, when nothing went wrong."""
    con = sqlite3.connect(str(db))
    try:
        pid, overlap = con.execute("SELECT id, overlap FROM projects WHERE name=?", (project,)).fetchone()
        votes = con.execute("SELECT v.id, v.client_id, v.item_id, v.annotator_id FROM votes v JOIN items i"
                            " ON i.id=v.item_id WHERE i.project_id=?", (pid,)).fetchall()
        per_item = dict(con.execute("SELECT i.id, COUNT(v.id) FROM items i LEFT JOIN votes v ON v.item_id=i.id"
                                    " WHERE i.project_id=? GROUP BY i.id", (pid,)).fetchall())
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()
    stored = {cid: vote for vote, cid, _, _ in votes}
    acked, sent, refused = result["acked"], set(result["sent"]), set(result["refused"])
    pairs = [(item, annotator) for _, _, item, annotator in votes]
    return {
        "votes": len(votes),
        "stored": stored,  # client id -> vote id
        "lost": sorted(c for c in acked if c not in stored),  # acknowledged, not in the store
        "wrong_vote_id": sorted(c for c in acked if c in stored and stored[c] != acked[c]),
        "without_client_id": [vote for vote, cid, _, _ in votes if cid is None],
        "duplicate_client_ids": sorted(c for c, n in Counter(cid for _, cid, _, _ in votes).items() if n > 1),
        "never_sent": sorted(c for c in stored if c not in sent),
        "stored_though_refused": sorted(c for c in stored if c in refused),
        "stored_unacknowledged": sorted(c for c in stored if c not in acked),  # allowed only among the unresolved
        "over_overlap": sorted(item for item, n in per_item.items() if n > overlap),
        "judged_twice": sorted(p for p, n in Counter(pairs).items() if n > 1),
        "items": len(per_item),
        "complete": sum(n >= overlap for n in per_item.values()),
        "integrity": integrity,
    }


def problems(report: dict, result: dict) -> list[str]:
    """The audit's findings that break a promise of the store (an unacknowledged vote that was still unresolved
    when the run ended may or may not be stored)."""
    bad = [k for k in ("lost", "wrong_vote_id", "without_client_id", "duplicate_client_ids", "never_sent",
                       "stored_though_refused", "over_overlap", "judged_twice") if report[k]]
    if set(report["stored_unacknowledged"]) - set(result["unresolved"]):
        bad.append("stored_unacknowledged")
    if report["integrity"] != "ok":
        bad.append("integrity")
    if result["summary"]["server_errors"]:
        bad.append("server_errors")
    return bad


def make_store(db: str | Path, project: str, items: int, overlap: int, lease_seconds: float,
               annotators: int) -> list[str]:
    """A pairwise project of ``items`` items (gold rate 0) and ``annotators`` annotators; returns their tokens."""
    store = SQLiteStore(db, seed=0)
    store.create_project(project, "pairwise", overlap=overlap, lease_seconds=lease_seconds, gold_rate=0.0)
    store.add_items(project, [{"prompt": f"question {i}", "responses": [f"answer {i} a", f"answer {i} b"]}
                              for i in range(items)])
    tokens = [store.add_annotator(f"annotator{i:03d}") for i in range(annotators)]
    store.close()
    return tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotators", type=int, default=50)
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--overlap", type=int, default=3)
    ap.add_argument("--lease-seconds", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--abandon-rate", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-after", type=float, help="SIGKILL the server this many seconds in, then restart it")
    ap.add_argument("--db", help="the store to create (default: a temporary file)")
    ap.add_argument("--out", help="also write the JSON summary here")
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the server

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(args.db or Path(tmp) / "feedback.sqlite")
        tokens = make_store(db, "load", args.items, args.overlap, args.lease_seconds, args.annotators)
        server = Server(db).start()
        try:
            result = run_load(server.url, tokens, "load", args.seconds, args.abandon_rate, args.seed,
                              args.kill_after, server=server)
        finally:
            server.stop()
        report = audit(db, "load", result)
    found = problems(report, result)
    summary = {**result["summary"], "store": {k: v if isinstance(v, (int, str)) else len(v) for k, v in report.items()},
               "problems": found}
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
