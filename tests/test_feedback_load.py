"""The feedback app under load on loopback: 50 annotators (bench/feedback_load.py's ``run_load``) against
``alignkit feedback serve``. Every acknowledged vote is stored once with the acknowledged id, nothing else is stored
but answers still unresolved when the run ended, no item goes over its overlap, nobody judges an item twice,
abandoned leases come back; the same after a SIGKILL of the server in the middle of the load, with the SQLite
file intact. And a lease counts from when it is granted, not from when it was asked for (under load a request
can wait seconds for the write lock)."""

import json
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _feedback_server import Server, serving  # noqa: E402
from feedback_load import audit, make_store, run_load  # noqa: E402

from alignkit.feedback.store import SQLiteStore  # noqa: E402

ANNOTATORS = 50


def check_exactly_once(result: dict, report: dict) -> None:
    """What the clients were told against what the store holds."""
    acked, stored = result["acked"], report["stored"]
    unresolved, refused = set(result["unresolved"]), set(result["refused"])
    assert set(acked) <= set(stored), f"acknowledged votes lost: {report['lost'][:5]}"
    assert {c: stored[c] for c in acked} == acked  # each stored under the vote id acknowledged
    assert set(stored) <= set(acked) | unresolved  # anything else stored was still being retried at the end
    assert not set(stored) & refused
    assert report["votes"] == len(stored)  # every vote has a client id, none twice
    assert report["votes"] == len(acked) + len(set(stored) & unresolved)
    assert report["over_overlap"] == [] and report["judged_twice"] == []
    assert report["integrity"] == "ok"
    assert result["summary"]["server_errors"] == 0


def report_latency(tmp_path: Path, name: str, summary: dict) -> None:
    out = tmp_path / f"{name}.json"
    out.write_text(json.dumps(summary, indent=1))
    lat = summary["latency"]
    print(f"\n{name}: {summary['acked']} votes, {summary['votes_per_s']} votes/s; "
          + "; ".join(f"{k} p50 {v['p50_ms']} ms p95 {v['p95_ms']} ms p99 {v['p99_ms']} ms" for k, v in lat.items())
          + f" ({out})")


def test_fifty_annotators_exactly_once_and_abandoned_leases_requeued(tmp_path):
    # 30 items x overlap 3 = 90 votes. Abandoned tasks (in the first 2 s) hold a slot each until their 1 s lease
    # expires, so every item completes only if those slots come back; the seed makes the annotators' first draws
    # abandon some of the first tasks.
    db = tmp_path / "fb.sqlite"
    tokens = make_store(db, "load", items=30, overlap=3, lease_seconds=1.0, annotators=ANNOTATORS)
    with serving(db) as server:
        result = run_load(server.url, tokens, "load", seconds=7.0, abandon_rate=0.3, seed=0, abandon_for=2.0)
    report = audit(db, "load", result)
    summary = result["summary"]
    report_latency(tmp_path, "feedback_load", summary)

    check_exactly_once(result, report)
    # a healthy server answers every request: nothing is left unresolved, the store holds exactly the acked votes
    assert summary["network_errors"] == 0 and result["unresolved"] == []
    assert set(report["stored"]) == set(result["acked"])
    assert summary["sent"] == summary["acked"] + summary["refused"]

    assert result["abandoned"]
    assert report["complete"] == report["items"] == 30 and report["votes"] == 90
    voters: dict[int, list[str]] = {}
    for v in SQLiteStore(db).votes("load"):
        voters.setdefault(v["item"], []).append(v["annotator"])
    for a in result["abandoned"]:
        others = [name for name in voters[a["item"]] if name != f"annotator{a['annotator']:03d}"]
        assert len(others) >= 2  # the abandoned slot went to someone (the abandoner may have taken it again)

    for kind in ("next", "answer"):
        assert summary["latency"][kind]["p95_ms"] < 2000, summary["latency"]


def test_sigkill_mid_load_loses_no_acknowledged_vote(tmp_path):
    db = tmp_path / "fb.sqlite"
    tokens = make_store(db, "load", items=400, overlap=3, lease_seconds=2.0, annotators=ANNOTATORS)
    server = Server(db).start()
    try:
        result = run_load(server.url, tokens, "load", seconds=9.0, abandon_rate=0.1, seed=1, kill_after=3.0,
                          server=server)
    finally:
        server.stop()
    report = audit(db, "load", result)
    summary = result["summary"]
    report_latency(tmp_path, "feedback_load_sigkill", summary)

    kill = summary["kill"]
    assert kill["acked_before_kill"] > 0 and kill["acked_after_kill"] > 0
    assert summary["network_errors"] > 0  # the kill cut requests in flight; their retries went to the new server
    check_exactly_once(result, report)
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_lease_runs_from_when_it_is_granted(tmp_path):
    """A next_task that waits for the write lock longer than the lease must not hand out a lease that has already
    expired (which the next request would delete and give to someone else, refusing the answer)."""
    db = tmp_path / "fb.sqlite"
    store = SQLiteStore(db, seed=0)
    store.create_project("p", "pairwise", overlap=1, lease_seconds=0.5, gold_rate=0.0)
    store.add_items("p", [{"prompt": "q", "responses": ["x", "y"]}])
    ann, other = store.add_annotator("ann"), store.add_annotator("other")
    ann_id, other_id = store.authenticate(ann)["id"], store.authenticate(other)["id"]

    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock for longer than the lease
    got = {}
    asker = threading.Thread(target=lambda: got.update(task=store.next_task(ann_id, "p")))
    asker.start()
    time.sleep(1.0)
    blocker.execute("COMMIT")
    asker.join(30)
    task = got["task"]
    assert task is not None and task["expires"] > time.time()
    assert store.next_task(other_id, "p") is None  # the item is still leased to ann
    assert store.submit(ann_id, task["lease"], {"choice": "a"}, "c1")["duplicate"] is False
    blocker.close()
