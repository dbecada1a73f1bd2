"""The feedback app's store: projects, items, annotators, leases and votes in one SQLite file (WAL mode).

Everything the web app does is a method here, so tests call the same code without a browser or a server.
:class:`FeedbackStore` is the interface a second backend (PostgreSQL) would implement; :class:`SQLiteStore` is
the default.

Assignment (:meth:`SQLiteStore.next_task`):

- each item is judged by ``overlap`` distinct annotators: a task is a *lease* on an item, counted against the
  overlap until it is answered or expires (``lease_seconds``); an expired lease is deleted and its slot re-queued;
- nobody judges an item twice (a vote or a skip by the annotator excludes it), and an item whose responses the
  annotator wrote (``author``, e.g. the correction they gave in a thumbs task) never comes back to them;
- gold items (a known answer) are mixed in at ``gold_rate`` and have no overlap: every annotator may meet each once
  (and meets those left when nothing else is; with ``gold_rate=0`` they are never shown);
- items with a higher ``priority`` come first (the loop's active selection sets it), then items closest to their
  overlap (so items complete rather than all being half done), then the oldest;
- every task shows the responses in a fresh random order, recorded on the lease and the vote; votes are stored
  in the items' own order.

Votes (:meth:`SQLiteStore.submit`) are written in one transaction and acknowledged only after it commits. A vote
carries the client's id: sending it again returns the stored vote (exactly once, whatever the network did). Expired
leases are removed when anyone next asks for a task; until then a late answer is still taken if the item has a free
slot. A lease already removed, or an item already complete, refuses the late answer (409).
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

from alignkit.data.formats import Origin, read_rows
from alignkit.errors import DataError

KINDS = ("pairwise", "ranking", "thumbs", "arena")
PAIR_CHOICES = ("a", "b", "tie", "both_bad")
THUMBS = ("up", "down")
ROLES = ("admin", "annotator")
LIMITS = dict(name=100, prompt=20_000, response=20_000, reason=2_000, correction=8_000, message=4_000,
              instructions=5_000, responses=8, turns=40, client_id=100)


class FeedbackError(Exception):
    """A request the store refuses; ``status`` is the HTTP status the app answers with."""

    status = 400


class NotFound(FeedbackError):
    status = 404


class Conflict(FeedbackError):
    status = 409


class TooLarge(FeedbackError):
    status = 413


SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, kind TEXT NOT NULL, overlap INTEGER NOT NULL,
    lease_seconds REAL NOT NULL, gold_rate REAL NOT NULL, instructions TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, role TEXT NOT NULL, token_hash TEXT UNIQUE NOT NULL,
    active INTEGER NOT NULL DEFAULT 1, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, project_id INTEGER NOT NULL REFERENCES projects(id), external_id TEXT,
    prompt TEXT NOT NULL, responses TEXT NOT NULL, gold TEXT, meta TEXT NOT NULL, priority REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS items_project ON items(project_id, priority);
CREATE TABLE IF NOT EXISTS authors (
    item_id INTEGER NOT NULL REFERENCES items(id), annotator TEXT NOT NULL, PRIMARY KEY (item_id, annotator));
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, item_id INTEGER NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id), display TEXT NOT NULL, expires REAL NOT NULL,
    UNIQUE (item_id, annotator_id));
CREATE INDEX IF NOT EXISTS leases_item ON leases(item_id);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id), answer TEXT NOT NULL, display TEXT NOT NULL,
    client_id TEXT UNIQUE, seconds REAL, created REAL NOT NULL, UNIQUE (item_id, annotator_id));
CREATE INDEX IF NOT EXISTS votes_item ON votes(item_id);
CREATE TABLE IF NOT EXISTS skips (
    item_id INTEGER NOT NULL REFERENCES items(id), annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    PRIMARY KEY (item_id, annotator_id));
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _limited(value: Any, field: str, limit: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise FeedbackError(f"{field}: expected a non-empty string")
    if len(value) > LIMITS[limit]:
        raise TooLarge(f"{field}: {len(value)} characters, at most {LIMITS[limit]}")
    return value


# ------------------------------------------------------------------------------------------------- items


def parse_item(row: dict, kind: str) -> dict:
    """Check one item row and return it normalised: ``prompt`` (a string, or chat messages), ``responses``
    (strings or ``{"text", "model", "author"}``), optional ``gold``, ``id`` and ``meta``. Raises ``_Field``."""
    if not isinstance(row, dict):
        raise _Field(None, "expected a JSON object")
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        if not prompt or len(prompt) > LIMITS["turns"]:
            raise _Field("prompt", f"expected 1 to {LIMITS['turns']} messages")
        for turn in prompt:
            if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
                raise _Field("prompt", "each message needs a role of system, user or assistant")
            _checked(turn.get("content"), "prompt", "prompt")
    else:
        _checked(prompt, "prompt", "prompt")
    raw = row.get("responses")
    if raw is None and "chosen" in row and "rejected" in row:
        raw = [row["chosen"], row["rejected"]]
    if not isinstance(raw, list):
        raise _Field("responses", "expected a list of responses")
    want = {"pairwise": (2, 2), "arena": (2, 2), "thumbs": (1, 1), "ranking": (2, LIMITS["responses"])}[kind]
    if not want[0] <= len(raw) <= want[1]:
        n = f"{want[0]}" if want[0] == want[1] else f"{want[0]} to {want[1]}"
        raise _Field("responses", f"a {kind} item has {n} responses, got {len(raw)}")
    responses = []
    for i, r in enumerate(raw):
        r = {"text": r} if isinstance(r, str) else r
        if not isinstance(r, dict):
            raise _Field(f"responses[{i}]", "expected a string or an object with 'text'")
        text = _checked(r.get("text"), f"responses[{i}].text", "response")
        model, author = r.get("model"), r.get("author")
        for name, v in (("model", model), ("author", author)):
            if v is not None and (not isinstance(v, str) or len(v) > LIMITS["name"]):
                raise _Field(f"responses[{i}].{name}", f"expected a string of at most {LIMITS['name']} characters")
        responses.append({"text": text, "model": model, "author": author})
    if kind != "arena" and len({r["text"] for r in responses}) < len(responses):  # two models may agree
        raise _Field("responses", "two responses are identical")
    gold = row.get("gold")
    if gold is not None:
        gold = _check_answer(kind, gold, len(responses), "gold")
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise _Field("meta", "expected an object")
    ext = row.get("id")
    return {"prompt": prompt, "responses": responses, "gold": gold, "meta": meta,
            "external_id": None if ext is None else str(ext)}


class _Field(Exception):
    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _checked(value: Any, field: str, limit: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Field(field, "expected a non-empty string")
    if len(value) > LIMITS[limit]:
        raise _Field(field, f"{len(value)} characters, at most {LIMITS[limit]}")
    return value


def _check_answer(kind: str, answer: Any, k: int, field: str):
    """A gold answer in the items' own order: pairwise/arena a|b|tie|both_bad, ranking a permutation of 0..k-1
    (best first), thumbs up|down."""
    if kind in ("pairwise", "arena"):
        if answer not in PAIR_CHOICES:
            raise _Field(field, f"expected one of {', '.join(PAIR_CHOICES)}")
    elif kind == "ranking":
        if not isinstance(answer, list) or sorted(answer) != list(range(k)) or any(type(x) is not int for x in answer):
            raise _Field(field, f"expected a ranking: the response indices 0..{k - 1}, best first")
    elif answer not in THUMBS:
        raise _Field(field, "expected up or down")
    return answer


# --------------------------------------------------------------------------------------------- interface


class FeedbackStore(Protocol):
    """What the app and the loop need from a store; :class:`SQLiteStore` implements it."""

    def create_project(self, name: str, kind: str, **settings) -> dict: ...
    def project(self, name: str) -> dict: ...
    def projects(self) -> list[dict]: ...
    def add_annotator(self, name: str, role: str = "annotator") -> str: ...
    def authenticate(self, token: str) -> dict | None: ...
    def add_items(self, project: str, rows: list[dict]) -> list[int]: ...
    def next_task(self, annotator_id: int, project: str, now: float | None = None) -> dict | None: ...
    def submit(self, annotator_id: int, lease_id: int, answer: dict, client_id: str | None = None,
               now: float | None = None) -> dict: ...
    def votes(self, project: str) -> list[dict]: ...


class SQLiteStore:
    """The default store: one SQLite file in WAL mode, one connection per thread, each write one transaction
    (``BEGIN IMMEDIATE``: writers queue rather than fail), ``synchronous=FULL`` so an acknowledged vote survives
    a crash of the process or the machine."""

    def __init__(self, path: str | Path, seed: int | None = None):
        self.path = str(path)
        self._local = threading.local()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn().executescript(SCHEMA)
        secret = self._conn().execute("SELECT value FROM settings WHERE key='secret'").fetchone()
        if secret is None:
            with self._write() as db:
                db.execute("INSERT OR IGNORE INTO settings VALUES ('secret', ?)", (secrets.token_hex(32),))
            secret = self._conn().execute("SELECT value FROM settings WHERE key='secret'").fetchone()
        self.secret = secret[0]

    # -- connections and transactions

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def sample(self, population, k: int) -> list:
        """``k`` distinct members of ``population`` from the store's seeded generator (the arena's two models)."""
        with self._rng_lock:
            return self._rng.sample(list(population), k)

    def _shuffle(self, n: int) -> list[int]:
        with self._rng_lock:
            order = list(range(n))
            self._rng.shuffle(order)
            return order

    # -- projects and annotators

    def create_project(self, name: str, kind: str, overlap: int = 3, lease_seconds: float = 600.0,
                       gold_rate: float = 0.1, instructions: str = "") -> dict:
        _limited(name, "name", "name")
        if kind not in KINDS:
            raise FeedbackError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if int(overlap) < 1 or float(lease_seconds) <= 0 or not 0 <= float(gold_rate) <= 1:
            raise FeedbackError("overlap must be >= 1, lease_seconds > 0 and gold_rate in [0, 1]")
        _limited(instructions, "instructions", "instructions", required=False)
        with self._write() as db:
            if db.execute("SELECT 1 FROM projects WHERE name=?", (name,)).fetchone():
                raise Conflict(f"project {name!r} exists")
            db.execute("INSERT INTO projects (name, kind, overlap, lease_seconds, gold_rate, instructions, created)"
                       " VALUES (?,?,?,?,?,?,?)", (name, kind, int(overlap), float(lease_seconds),
                                                   float(gold_rate), instructions, time.time()))
        return self.project(name)

    def project(self, name: str) -> dict:
        row = self._conn().execute("SELECT * FROM projects WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no project {name!r}")
        return dict(row)

    def projects(self) -> list[dict]:
        rows = self._conn().execute("SELECT * FROM projects ORDER BY id").fetchall()
        return [{**dict(r), **self.counts(r["name"])} for r in rows]

    def add_annotator(self, name: str, role: str = "annotator") -> str:
        """Register an annotator (or an admin) and return their token; only its hash is stored."""
        _limited(name, "name", "name")
        if role not in ROLES:
            raise FeedbackError(f"role: expected one of {', '.join(ROLES)}")
        token = secrets.token_urlsafe(24)
        with self._write() as db:
            if db.execute("SELECT 1 FROM annotators WHERE name=?", (name,)).fetchone():
                raise Conflict(f"annotator {name!r} exists")
            db.execute("INSERT INTO annotators (name, role, token_hash, created) VALUES (?,?,?,?)",
                       (name, role, hash_token(token), time.time()))
        return token

    def authenticate(self, token: str) -> dict | None:
        if not isinstance(token, str) or not token or len(token) > 200:
            return None
        row = self._conn().execute("SELECT id, name, role FROM annotators WHERE token_hash=? AND active=1",
                                   (hash_token(token),)).fetchone()
        return None if row is None else dict(row)

    def annotators(self) -> list[dict]:
        return [dict(r) for r in self._conn().execute("SELECT id, name, role, active FROM annotators ORDER BY id")]

    # -- items

    def add_items(self, project: str, rows: list[dict]) -> list[int]:
        """Add items (rows as :func:`parse_item` takes them; a bad row raises FeedbackError naming its index)."""
        kind = self.project(project)["kind"]
        items = []
        for i, row in enumerate(rows):
            try:
                items.append(parse_item(row, kind))
            except _Field as exc:
                raise FeedbackError(f"item {i}: {exc.field or 'row'}: {exc.message}") from None
        return self._insert(project, items)

    def import_file(self, project: str, path: str) -> list[int]:
        """Add every row of a JSONL/JSON/CSV/Parquet file, all or none; a bad row raises DataError naming the
        file, the line and the field."""
        kind = self.project(project)["kind"]
        items = []
        origin: Origin | None = None
        for origin, row in read_rows(path):
            try:
                items.append(parse_item(row, kind))
            except _Field as exc:
                raise origin.error(exc.message, exc.field) from None
        if not items:
            raise DataError("no rows", path=path)
        return self._insert(project, items)

    def _insert(self, project: str, items: list[dict]) -> list[int]:
        now, ids = time.time(), []
        with self._write() as db:
            pid = db.execute("SELECT id FROM projects WHERE name=?", (project,)).fetchone()[0]
            for it in items:
                cur = db.execute(
                    "INSERT INTO items (project_id, external_id, prompt, responses, gold, meta, created)"
                    " VALUES (?,?,?,?,?,?,?)",
                    (pid, it["external_id"], json.dumps(it["prompt"]), json.dumps(it["responses"]),
                     None if it["gold"] is None else json.dumps(it["gold"]), json.dumps(it["meta"]), now))
                ids.append(cur.lastrowid)
                for author in {r["author"] for r in it["responses"] if r["author"]}:
                    db.execute("INSERT OR IGNORE INTO authors VALUES (?,?)", (cur.lastrowid, author))
        return ids

    def set_priority(self, priorities: dict[int, float]) -> None:
        """Set the items' priorities (higher first): the loop's active selection."""
        with self._write() as db:
            db.executemany("UPDATE items SET priority=? WHERE id=?", [(float(p), int(i)) for i, p in priorities.items()])

    def items(self, project: str) -> list[dict]:
        pid = self.project(project)["id"]
        rows = self._conn().execute("SELECT * FROM items WHERE project_id=? ORDER BY id", (pid,)).fetchall()
        return [_item(r) for r in rows]

    # -- tasks and votes

    def next_task(self, annotator_id: int, project: str, now: float | None = None) -> dict | None:
        """Lease the annotator's next item of ``project`` (or return the lease they already hold), or None when
        nothing is left for them."""
        p = self.project(project)
        with self._write() as db:
            now = time.time() if now is None else now  # once the lock is held: the lease runs from its grant
            db.execute("DELETE FROM leases WHERE expires <= ?", (now,))
            held = db.execute(
                "SELECT l.* FROM leases l JOIN items i ON i.id=l.item_id WHERE l.annotator_id=? AND i.project_id=?"
                " ORDER BY l.id LIMIT 1", (annotator_id, p["id"])).fetchone()
            if held is not None:
                return self._task(db, held, p)
            name = db.execute("SELECT name FROM annotators WHERE id=?", (annotator_id,)).fetchone()[0]
            open_to_me = (
                "i.project_id=:p AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id=i.id AND v.annotator_id=:a)"
                " AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.item_id=i.id AND s.annotator_id=:a)"
                " AND NOT EXISTS (SELECT 1 FROM authors w WHERE w.item_id=i.id AND w.annotator=:n)")
            args = {"p": p["id"], "a": annotator_id, "n": name}
            row = None
            with self._rng_lock:
                want_gold = self._rng.random() < p["gold_rate"]
            gold = f"SELECT i.id FROM items i WHERE {open_to_me} AND i.gold IS NOT NULL ORDER BY i.priority DESC, i.id LIMIT 1"
            if want_gold:
                row = db.execute(gold, args).fetchone()
            if row is None:
                row = db.execute(
                    f"SELECT i.id, (SELECT COUNT(*) FROM votes v WHERE v.item_id=i.id)"
                    f" + (SELECT COUNT(*) FROM leases l WHERE l.item_id=i.id) AS taken"
                    f" FROM items i WHERE {open_to_me} AND i.gold IS NULL AND taken < :k"
                    f" ORDER BY i.priority DESC, taken DESC, i.id LIMIT 1", {**args, "k": p["overlap"]}).fetchone()
            if row is None and p["gold_rate"] > 0:  # nothing else left for them: a gold item they have not seen
                row = db.execute(gold, args).fetchone()
            if row is None:
                return None
            n = len(json.loads(db.execute("SELECT responses FROM items WHERE id=?", (row["id"],)).fetchone()[0]))
            cur = db.execute("INSERT INTO leases (item_id, annotator_id, display, expires) VALUES (?,?,?,?)",
                             (row["id"], annotator_id, json.dumps(self._shuffle(n)), now + p["lease_seconds"]))
            lease = db.execute("SELECT * FROM leases WHERE id=?", (cur.lastrowid,)).fetchone()
            return self._task(db, lease, p)

    def lease_item(self, annotator_id: int, item_id: int, now: float | None = None) -> dict:
        """Lease one given item to the annotator (the arena: the user who asked judges their own turn)."""
        with self._write() as db:
            now = time.time() if now is None else now
            item = db.execute("SELECT i.responses, p.* FROM items i JOIN projects p ON p.id=i.project_id"
                              " WHERE i.id=?", (item_id,)).fetchone()
            if item is None:
                raise NotFound("no such item")
            n = len(json.loads(item["responses"]))
            cur = db.execute("INSERT INTO leases (item_id, annotator_id, display, expires) VALUES (?,?,?,?)",
                             (item_id, annotator_id, json.dumps(self._shuffle(n)), now + item["lease_seconds"]))
            lease = db.execute("SELECT * FROM leases WHERE id=?", (cur.lastrowid,)).fetchone()
            return self._task(db, lease, dict(item))

    def _task(self, db: sqlite3.Connection, lease: sqlite3.Row, project: dict) -> dict:
        item = _item(db.execute("SELECT * FROM items WHERE id=?", (lease["item_id"],)).fetchone())
        display = json.loads(lease["display"])
        return {"lease": lease["id"], "item": item["id"], "project": project["name"], "kind": project["kind"],
                "instructions": project["instructions"], "prompt": item["prompt"], "expires": lease["expires"],
                "responses": [item["responses"][j]["text"] for j in display]}

    def skip(self, annotator_id: int, lease_id: int) -> None:
        """Give a task back without answering: the slot is re-queued and the item does not come back to them."""
        with self._write() as db:
            lease = db.execute("SELECT * FROM leases WHERE id=? AND annotator_id=?", (lease_id, annotator_id)).fetchone()
            if lease is None:
                raise NotFound("no such task (it may have expired)")
            db.execute("DELETE FROM leases WHERE id=?", (lease_id,))
            db.execute("INSERT OR IGNORE INTO skips VALUES (?,?)", (lease["item_id"], annotator_id))

    def submit(self, annotator_id: int, lease_id: int, answer: dict, client_id: str | None = None,
               now: float | None = None) -> dict:
        """Store the annotator's answer to a task, in the display order they saw:

        - pairwise/arena: ``{"choice": "a"|"b"|"tie"|"both_bad", "reason": optional}`` (a = the first shown);
        - ranking: ``{"ranking": [display positions, best first]}``;
        - thumbs: ``{"thumb": "up"|"down", "correction": optional better answer}``.

        Returns ``{"vote": id, "duplicate": bool}`` once the transaction has committed."""
        now = time.time() if now is None else now
        if client_id is not None:
            _limited(client_id, "client_id", "client_id")
        with self._write() as db:
            if client_id is not None:
                old = db.execute("SELECT id, annotator_id FROM votes WHERE client_id=?", (client_id,)).fetchone()
                if old is not None:
                    if old["annotator_id"] != annotator_id:
                        raise Conflict("client_id was used by another annotator")
                    return {"vote": old["id"], "duplicate": True}
            lease = db.execute("SELECT * FROM leases WHERE id=?", (lease_id,)).fetchone()
            if lease is not None and lease["annotator_id"] != annotator_id:
                raise NotFound("no such task")
            if lease is None:  # expired (or never existed): take it late only if the item still has a free slot
                raise Conflict("the task expired and was given to someone else; ask for the next one")
            item = db.execute("SELECT i.*, p.kind, p.overlap FROM items i JOIN projects p ON p.id=i.project_id"
                              " WHERE i.id=?", (lease["item_id"],)).fetchone()
            display = json.loads(lease["display"])
            stored = _to_item_order(item["kind"], answer, display)
            if lease["expires"] <= now and item["gold"] is None:
                taken = db.execute("SELECT (SELECT COUNT(*) FROM votes WHERE item_id=:i) + (SELECT COUNT(*) FROM"
                                   " leases WHERE item_id=:i AND id!=:l AND expires > :t)",
                                   {"i": item["id"], "l": lease_id, "t": now}).fetchone()[0]
                if taken >= item["overlap"]:
                    db.execute("DELETE FROM leases WHERE id=?", (lease_id,))
                    raise Conflict("the task expired and its item is complete; ask for the next one")
            if db.execute("SELECT 1 FROM votes WHERE item_id=? AND annotator_id=?",
                          (item["id"], annotator_id)).fetchone():
                raise Conflict("you already judged this item")
            issued = lease["expires"] - self.project_by_id(db, item["project_id"])["lease_seconds"]
            cur = db.execute("INSERT INTO votes (item_id, annotator_id, answer, display, client_id, seconds, created)"
                             " VALUES (?,?,?,?,?,?,?)", (item["id"], annotator_id, json.dumps(stored),
                                                          lease["display"], client_id, max(0.0, now - issued), now))
            db.execute("DELETE FROM leases WHERE id=?", (lease_id,))
            return {"vote": cur.lastrowid, "duplicate": False}

    @staticmethod
    def project_by_id(db: sqlite3.Connection, pid: int) -> dict:
        return dict(db.execute("SELECT * FROM projects WHERE id=?", (pid,)).fetchone())

    def votes(self, project: str) -> list[dict]:
        """Every vote of ``project`` with its item and annotator, in the items' own order."""
        pid = self.project(project)["id"]
        rows = self._conn().execute(
            "SELECT v.id AS vote, v.item_id AS item, a.name AS annotator, v.answer, v.display, v.seconds, v.created"
            " FROM votes v JOIN items i ON i.id=v.item_id JOIN annotators a ON a.id=v.annotator_id"
            " WHERE i.project_id=? ORDER BY v.id", (pid,)).fetchall()
        return [{**dict(r), "answer": json.loads(r["answer"]), "display": json.loads(r["display"])} for r in rows]

    def counts(self, project: str) -> dict:
        p = self.project(project)
        db = self._conn()
        one = lambda sql: db.execute(sql, (p["id"],)).fetchone()[0]  # noqa: E731
        return {
            "items": one("SELECT COUNT(*) FROM items WHERE project_id=?"),
            "gold_items": one("SELECT COUNT(*) FROM items WHERE project_id=? AND gold IS NOT NULL"),
            "votes": one("SELECT COUNT(*) FROM votes v JOIN items i ON i.id=v.item_id WHERE i.project_id=?"),
            "complete": one(f"SELECT COUNT(*) FROM items i WHERE i.project_id=? AND i.gold IS NULL AND"
                            f" (SELECT COUNT(*) FROM votes v WHERE v.item_id=i.id) >= {int(p['overlap'])}"),
            "leases": one("SELECT COUNT(*) FROM leases l JOIN items i ON i.id=l.item_id WHERE i.project_id=?"),
        }

    def snapshot_hash(self, project: str) -> str:
        """A hash of the project's votes (ids, items, annotators, answers): names a round's data in the loop."""
        h = hashlib.sha256()
        for v in self.votes(project):
            h.update(json.dumps([v["vote"], v["item"], v["annotator"], v["answer"]], sort_keys=True).encode())
        return h.hexdigest()[:16]


def _item(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "external_id": row["external_id"], "prompt": json.loads(row["prompt"]),
            "responses": json.loads(row["responses"]), "gold": None if row["gold"] is None else json.loads(row["gold"]),
            "meta": json.loads(row["meta"]), "priority": row["priority"]}


def _to_item_order(kind: str, answer: Any, display: list[int]) -> dict:
    """An answer given on the display order, validated and mapped to the item's own order."""
    if not isinstance(answer, dict):
        raise FeedbackError("answer: expected an object")
    k = len(display)
    if kind in ("pairwise", "arena"):
        choice = answer.get("choice")
        if choice not in PAIR_CHOICES:
            raise FeedbackError(f"choice: expected one of {', '.join(PAIR_CHOICES)}")
        if choice in ("a", "b"):
            choice = "ab"[display["ab".index(choice)]]
        return {"choice": choice, "reason": _limited(answer.get("reason"), "reason", "reason", required=False)}
    if kind == "ranking":
        ranking = answer.get("ranking")
        if not isinstance(ranking, list) or sorted(ranking) != list(range(k)) or any(type(x) is not int for x in ranking):
            raise FeedbackError(f"ranking: expected the display positions 0..{k - 1}, best first")
        return {"ranking": [display[p] for p in ranking]}
    thumb = answer.get("thumb")
    if thumb not in THUMBS:
        raise FeedbackError("thumb: expected up or down")
    correction = _limited(answer.get("correction"), "correction", "correction", required=False)
    if correction and thumb == "up":
        raise FeedbackError("correction: only with a thumbs down")
    return {"thumb": thumb, "correction": correction}
