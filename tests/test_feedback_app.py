"""The feedback app over HTTP (Starlette's test client, no browser): tokens and roles, CSRF, size limits,
the task flow for each kind, the arena, the admin routes, and the security headers."""

import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from alignkit.feedback.app import create_app  # noqa: E402
from alignkit.feedback.store import SQLiteStore  # noqa: E402


@pytest.fixture
def app(tmp_path):
    store = SQLiteStore(tmp_path / "fb.sqlite", seed=0)
    store.create_project("pairs", "pairwise", overlap=2, gold_rate=0.0)
    store.add_items("pairs", [{"prompt": f"q{i}", "responses": [{"text": f"a{i}", "model": "m1"},
                                                                 {"text": f"b{i}", "model": "m2"}]} for i in range(4)])
    store.create_project("rank", "ranking", overlap=1)
    store.add_items("rank", [{"prompt": "order these", "responses": ["w", "x", "y", "z"]}])
    store.create_project("chat", "arena", overlap=1)
    tokens = {"ann": store.add_annotator("ann"), "bob": store.add_annotator("bob"),
              "boss": store.add_annotator("boss", "admin")}
    responders = {"echo": lambda msgs: "echo: " + msgs[-1]["content"], "shout": lambda msgs: msgs[-1]["content"].upper()}
    return store, TestClient(create_app(store, responders=responders, max_body=4096)), tokens


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_no_token_401_annotator_on_admin_403(app):
    store, client, tok = app
    assert client.get("/api/projects").status_code == 401
    assert client.get("/api/projects", headers=bearer("wrong")).status_code == 401
    assert client.get("/api/projects", headers=bearer(tok["ann"])).status_code == 200
    for path in ("/api/admin/projects/pairs/stats", "/api/admin/projects/pairs/export?format=pairs",
                 "/api/admin/projects/pairs/plot/items.png"):
        assert client.get(path, headers=bearer(tok["ann"])).status_code == 403, path
        assert client.get(path).status_code == 401, path
    r = client.post("/api/admin/annotators", headers=bearer(tok["ann"]), json={"name": "eve"})
    assert r.status_code == 403 and store.authenticate("x") is None
    assert client.get("/api/admin/projects/pairs/stats", headers=bearer(tok["boss"])).status_code == 200


def test_cookie_session_needs_csrf_header_and_json(app):
    store, client, tok = app
    r = client.post("/api/login", json={"token": tok["ann"]})
    assert r.status_code == 200 and "ak_session" in r.cookies
    csrf = r.json()["csrf"]
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    assert client.get("/api/projects").status_code == 200  # reads need no CSRF token
    assert client.post("/api/projects/pairs/next", json={}).status_code == 403  # no X-CSRF-Token
    assert client.post("/api/projects/pairs/next", json={}, headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    form = client.post("/api/projects/pairs/next", data={"x": "1"}, headers={"X-CSRF-Token": csrf})
    assert form.status_code == 403  # a cross-site form cannot send JSON
    r = client.post("/api/projects/pairs/next", json={}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["task"]["kind"] == "pairwise"
    assert client.get("/api/me").json()["csrf"] == csrf  # a reloaded page gets it back from its session
    assert store.counts("pairs")["leases"] == 1


def test_pairwise_flow_and_exactly_once(app):
    store, client, tok = app
    h = bearer(tok["ann"])
    task = client.post("/api/projects/pairs/next", headers=h, json={}).json()["task"]
    body = {"answer": {"choice": "b", "reason": "shorter"}, "client_id": "vote-1"}
    first = client.post(f"/api/tasks/{task['lease']}/answer", headers=h, json=body)
    again = client.post(f"/api/tasks/{task['lease']}/answer", headers=h, json=body)
    assert first.status_code == 200 and again.json() == {"vote": first.json()["vote"], "duplicate": True}
    (vote,) = store.votes("pairs")
    shown_second = task["responses"][1]
    assert vote["answer"]["choice"] == ("a" if shown_second.startswith("a") else "b")
    bad = client.post(f"/api/tasks/{task['lease']}/answer", headers=bearer(tok["bob"]), json=body)
    assert bad.status_code == 409  # someone else's client id


def test_ranking_and_bad_answers(app):
    store, client, tok = app
    h = bearer(tok["ann"])
    task = client.post("/api/projects/rank/next", headers=h, json={}).json()["task"]
    r = client.post(f"/api/tasks/{task['lease']}/answer", headers=h, json={"answer": {"ranking": [0, 0, 1, 2]}})
    assert r.status_code == 400 and "ranking" in r.json()["error"]
    r = client.post(f"/api/tasks/{task['lease']}/answer", headers=h, json={"answer": {"ranking": [3, 2, 1, 0]}})
    assert r.status_code == 200
    assert store.votes("rank")[0]["answer"]["ranking"] == [ "wxyz".index(t) for t in task["responses"][::-1]]
    assert client.post("/api/projects/rank/next", headers=h, json={}).json()["task"] is None


def test_size_limits(app):
    store, client, tok = app
    h = bearer(tok["ann"])
    task = client.post("/api/projects/pairs/next", headers=h, json={}).json()["task"]
    big = {"answer": {"choice": "a", "reason": "x" * 5000}}
    assert client.post(f"/api/tasks/{task['lease']}/answer", headers=h, json=big).status_code == 413
    reason = {"answer": {"choice": "a", "reason": "x" * 2001}}
    assert client.post(f"/api/tasks/{task['lease']}/answer", headers=h, json=reason).status_code == 413

    def chunks():  # no Content-Length: the limit still holds while the body streams in
        for _ in range(10):
            yield b"x" * 1000

    r = client.post(f"/api/tasks/{task['lease']}/answer", headers={**h, "Content-Type": "application/json"},
                    content=chunks())
    assert r.status_code == 413 and store.votes("pairs") == []


def test_arena_turn_is_a_leased_pairwise_item(app):
    store, client, tok = app
    h = bearer(tok["bob"])
    r = client.post("/api/projects/chat/arena", headers=h, json={"messages": [{"role": "user", "content": "hi"}]})
    task = r.json()["task"]
    assert sorted(task["responses"]) == ["HI", "echo: hi"]
    pick = task["responses"].index("HI")
    client.post(f"/api/tasks/{task['lease']}/answer", headers=h, json={"answer": {"choice": "ab"[pick]}})
    from alignkit.feedback.export import battles

    assert battles(store, "chat") == [{"model_a": store.items("chat")[0]["responses"][0]["model"],
                                       "model_b": store.items("chat")[0]["responses"][1]["model"],
                                       "winner": "ab"[[x["text"] for x in store.items("chat")[0]["responses"]].index("HI")]}]
    bad = client.post("/api/projects/pairs/arena", headers=h, json={"messages": [{"role": "user", "content": "hi"}]})
    assert bad.status_code == 400 and "not an arena" in bad.json()["error"]
    bad = client.post("/api/projects/chat/arena", headers=h, json={"messages": [{"role": "system", "content": "x"}]})
    assert bad.status_code == 400


def test_pages_and_headers(app):
    _, client, tok = app
    for path in ("/", "/admin", "/static/app.js", "/static/common.js", "/static/admin.js", "/static/app.css"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
    page = client.get("/").text
    assert "http://" not in page and "https://" not in page  # nothing from a CDN
    js = client.get("/static/app.js").text + client.get("/static/admin.js").text + client.get("/static/common.js").text
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js


def test_admin_export_stats_and_plots(app):
    store, client, tok = app
    for name in ("ann", "bob"):
        h = bearer(tok[name])
        while (task := client.post("/api/projects/pairs/next", headers=h, json={}).json()["task"]) is not None:
            first_is_m1 = task["responses"][0].startswith("a")
            client.post(f"/api/tasks/{task['lease']}/answer", headers=h,
                        json={"answer": {"choice": "a" if first_is_m1 else "b"}})  # both prefer m1
    a = bearer(tok["boss"])
    stats = client.get("/api/admin/projects/pairs/stats", headers=a).json()
    assert stats["counts"]["complete"] == 4 and stats["agreement"]["pairwise_agreement"] == 1.0
    assert [r["model"] for r in stats["leaderboard"]] == ["m1", "m2"]
    rows = [json.loads(x) for x in client.get("/api/admin/projects/pairs/export?format=pairs", headers=a).text.splitlines()]
    assert len(rows) == 4 and all(r["chosen"].startswith("a") and r["soft_label"] == 1.0 for r in rows)
    assert all(sorted(r["annotators"]) == ["ann", "bob"] for r in rows)
    for plot in stats["plots"]:
        png = client.get(f"/api/admin/projects/pairs/plot/{plot}.png", headers=a)
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/api/admin/projects/pairs/export?format=nope", headers=a).status_code == 400
