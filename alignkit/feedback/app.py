"""``alignkit feedback serve``: the web app annotators and users vote in (Starlette, served by uvicorn).

The web layer only authenticates, checks sizes and forwards to :class:`~alignkit.feedback.store.SQLiteStore` and
:mod:`alignkit.feedback.report`, which the tests call directly too. Pages and scripts ship in ``static/`` (no CDN).

Security:

- every API route needs a token (``Authorization: Bearer``, or the ``ak_session`` cookie set by ``POST /api/login``):
  none or an unknown one is 401; an annotator's token on an admin route is 403;
- state-changing requests authenticated by the cookie must carry ``X-CSRF-Token`` (an HMAC of the session the
  login returned; a page on another site cannot read it), and every request body must be JSON
  (``Content-Type: application/json``, which a cross-site form cannot send): otherwise 403;
- bodies over ``max_body`` bytes are refused (413) before they are read whole; each field has its own limit
  (:data:`~alignkit.feedback.store.LIMITS`);
- pages render model output and user text with ``textContent`` only, and the Content-Security-Policy allows
  scripts from the app itself only, so an injected ``<script>`` or ``onerror`` neither renders nor runs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from alignkit.feedback.store import LIMITS, FeedbackError, SQLiteStore, TooLarge

STATIC = Path(str(resources.files("alignkit.feedback") / "static"))
COOKIE = "ak_session"
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
Responder = Callable[[list[dict]], str]


def csrf_token(secret: str, token: str) -> str:
    return hmac.new(secret.encode(), b"csrf:" + token.encode(), hashlib.sha256).hexdigest()


def create_app(store: SQLiteStore, *, responders: dict[str, Responder] | None = None, max_body: int = 65_536,
               secure_cookie: bool = False) -> Starlette:
    """The app over ``store``. ``responders`` (name -> function from chat messages to a reply) serve the arena:
    each turn asks two of them, in random order."""
    responders = dict(responders or {})

    def caller(request: Request, admin: bool = False) -> dict:
        header = request.headers.get("authorization", "")
        by_cookie = not header.lower().startswith("bearer ")
        token = request.cookies.get(COOKIE, "") if by_cookie else header[7:].strip()
        who = store.authenticate(token)
        if who is None:
            raise HTTPException(401, "log in with your token")
        if request.method not in ("GET", "HEAD") and by_cookie:
            sent = request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(sent, csrf_token(store.secret, token)):
                raise HTTPException(403, "missing or wrong X-CSRF-Token")
        if admin and who["role"] != "admin":
            raise HTTPException(403, "admins only")
        return who

    async def body(request: Request) -> dict:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HTTPException(403, "send JSON (Content-Type: application/json)")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body):
            raise HTTPException(413, f"request body over {max_body} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_body:
                raise HTTPException(413, f"request body over {max_body} bytes")
        try:
            value = json.loads(data or b"{}")
        except ValueError:
            raise HTTPException(400, "the body is not JSON") from None
        if not isinstance(value, dict):
            raise HTTPException(400, "expected a JSON object")
        return value

    async def call(fn, *args, **kw):
        try:
            return await run_in_threadpool(fn, *args, **kw)
        except FeedbackError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    def page(name: str):
        async def serve(request: Request):
            return FileResponse(STATIC / name, headers=HEADERS)
        return serve

    async def login(request: Request):
        data = await body(request)
        who = store.authenticate(str(data.get("token", "")))
        if who is None:
            raise HTTPException(401, "unknown token")
        response = JSONResponse({**who, "csrf": csrf_token(store.secret, data["token"])}, headers=HEADERS)
        response.set_cookie(COOKIE, data["token"], httponly=True, samesite="strict", secure=secure_cookie)
        return response

    async def logout(request: Request):
        response = JSONResponse({"ok": True}, headers=HEADERS)
        response.delete_cookie(COOKIE)
        return response

    async def me(request: Request):
        who = caller(request)
        token = request.cookies.get(COOKIE, "")
        return JSONResponse({**who, "csrf": csrf_token(store.secret, token) if token else None}, headers=HEADERS)

    async def projects(request: Request):
        caller(request)
        keep = ("name", "kind", "instructions", "overlap", "items", "complete", "votes")
        rows = await call(store.projects)
        return JSONResponse([{k: p[k] for k in keep} for p in rows], headers=HEADERS)

    async def next_task(request: Request):
        who = caller(request)
        await body(request)
        task = await call(store.next_task, who["id"], request.path_params["project"])
        return JSONResponse({"task": task}, headers=HEADERS)

    async def answer(request: Request):
        who = caller(request)
        data = await body(request)
        ack = await call(store.submit, who["id"], request.path_params["lease"], data.get("answer"),
                         data.get("client_id"))
        return JSONResponse(ack, headers=HEADERS)

    async def skip(request: Request):
        who = caller(request)
        await body(request)
        await call(store.skip, who["id"], request.path_params["lease"])
        return JSONResponse({"ok": True}, headers=HEADERS)

    async def arena(request: Request):
        who = caller(request)
        data = await body(request)
        if len(responders) < 2:
            raise HTTPException(409, "the arena needs two models: start the server with --model twice")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages or len(messages) > LIMITS["turns"]:
            raise HTTPException(400, f"messages: expected 1 to {LIMITS['turns']} messages")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
                raise HTTPException(400, "messages: each needs a role (user or assistant) and a string content")
            if len(m["content"]) > LIMITS["message"]:
                raise HTTPException(413, f"a message over {LIMITS['message']} characters")
        task = await call(_arena_turn, store, who, request.path_params["project"], messages, responders)
        return JSONResponse({"task": task}, headers=HEADERS)

    async def admin_stats(request: Request):
        caller(request, admin=True)
        from alignkit.feedback.report import project_stats

        stats = await call(project_stats, store, request.path_params["project"])
        return JSONResponse(stats, headers=HEADERS)

    async def admin_plot(request: Request):
        caller(request, admin=True)
        from alignkit.feedback.report import plot_png

        png = await call(plot_png, store, request.path_params["project"], request.path_params["name"])
        return Response(png, media_type="image/png", headers=HEADERS)

    async def admin_export(request: Request):
        caller(request, admin=True)
        from alignkit.feedback.export import export_rows

        fmt = request.query_params.get("format", "pairs")
        rows = await call(export_rows, store, request.path_params["project"], fmt)
        text = "".join(json.dumps(r) + "\n" for r in rows)
        return Response(text, media_type="application/x-ndjson", headers=HEADERS)

    async def admin_create_project(request: Request):
        caller(request, admin=True)
        data = await body(request)
        settings = {k: data[k] for k in ("overlap", "lease_seconds", "gold_rate", "instructions") if k in data}
        project = await call(store.create_project, data.get("name"), data.get("kind"), **settings)
        return JSONResponse(project, headers=HEADERS)

    async def admin_add_items(request: Request):
        caller(request, admin=True)
        data = await body(request)
        ids = await call(store.add_items, request.path_params["project"], data.get("items") or [])
        return JSONResponse({"items": ids}, headers=HEADERS)

    async def admin_add_annotator(request: Request):
        caller(request, admin=True)
        data = await body(request)
        token = await call(store.add_annotator, data.get("name"), data.get("role", "annotator"))
        return JSONResponse({"name": data.get("name"), "token": token}, headers=HEADERS)

    async def errors(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=HEADERS)

    routes = [
        Route("/", page("index.html")),
        Route("/admin", page("admin.html")),
        Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/api/me", me),
        Route("/api/projects", projects),
        Route("/api/projects/{project}/next", next_task, methods=["POST"]),
        Route("/api/projects/{project}/arena", arena, methods=["POST"]),
        Route("/api/tasks/{lease:int}/answer", answer, methods=["POST"]),
        Route("/api/tasks/{lease:int}/skip", skip, methods=["POST"]),
        Route("/api/admin/projects", admin_create_project, methods=["POST"]),
        Route("/api/admin/annotators", admin_add_annotator, methods=["POST"]),
        Route("/api/admin/projects/{project}/items", admin_add_items, methods=["POST"]),
        Route("/api/admin/projects/{project}/stats", admin_stats),
        Route("/api/admin/projects/{project}/plot/{name}.png", admin_plot),
        Route("/api/admin/projects/{project}/export", admin_export),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: errors},
                    middleware=[Middleware(_SecurityHeaders)])
    app.state.store = store
    return app


class _SecurityHeaders:
    """Add :data:`HEADERS` to every response (the static files' and the framework's own errors included)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items() if k.lower().encode() not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def _arena_turn(store: SQLiteStore, who: dict, project: str, messages: list[dict],
                responders: dict[str, Responder]) -> dict:
    """Ask two of the models (chosen at random) for the next turn, store the two replies as an item of the arena
    project and lease it to the user who asked."""
    if store.project(project)["kind"] != "arena":
        raise FeedbackError(f"project {project!r} is not an arena")
    names = store.sample(sorted(responders), 2)
    replies = [responders[n](messages) for n in names]
    rows = [{"prompt": messages, "responses": [{"text": r[:LIMITS["response"]], "model": n}
                                               for r, n in zip(replies, names)],
             "meta": {"asked_by": who["name"]}}]
    (item,) = store.add_items(project, rows)
    return store.lease_item(who["id"], item)
