"""The console's route table and its single error page.

    browser -HTTPS-> uvicorn (collector.web.server) -> **app** -> views -> domain / reads

`create_app(console)` is framework glue only: decisions live in collector.triage,
collector.users and collector.trail; SQL lives in collector.web.reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from argon2 import PasswordHasher
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from collector.errors import (
    AuthError,
    CollectorError,
    NotFoundError,
    ThrottledError,
    TrailError,
    TriageError,
    UserError,
)
from collector.policy import Policy
from collector.store import SqliteStore
from collector.trail import Trail
from collector.triage import Triage
from collector.users import Sessions, Users
from collector.web.context import Console, current_session, make_templates, page
from collector.web.errors import ConsoleError, LoginRequiredError
from collector.web.reads import Reader
from collector.web.security import SecurityHeaders, harden
from collector.web.views import admin, alerts, auth, events, rules

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


def build_console(
    store: SqliteStore,
    policy: Policy,
    db_path: str | Path,
    *,
    clock: Callable[[], int] = time.time_ns,
    hasher: PasswordHasher | None = None,
    users: Users | None = None,
    sessions: Sessions | None = None,
) -> Console:
    """The console's collaborators over an open store; tests pass a `hasher` (cheaper
    Argon2 parameters), their own `users` or `sessions` (shorter timeouts).

    Every read goes through the console's own pool of read-only connections (`Reader`):
    the store's per-thread readers would gain one connection (two open files) for every
    worker thread the server starts, and it starts new ones after each idle spell.
    """
    reader = Reader(db_path)
    reads = reader.connection
    trail = Trail(store, reads=reads)
    return Console(
        store=store,
        reader=reader,
        users=users or Users(store, hasher=hasher, reads=reads),
        sessions=sessions or Sessions(store, reads=reads),
        trail=trail,
        triage=Triage(store, trail, reads=reads),
        policy=policy,
        templates=make_templates(),
        clock=clock,
    )


def _status(exc: CollectorError) -> int:
    if isinstance(exc, ConsoleError):
        return exc.status
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ThrottledError):
        return 429
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, TriageError | UserError | TrailError):
        return 409
    return 500


def _error_page(request: Request, status: int, message: str) -> Response:
    try:
        session = current_session(request)
    except CollectorError:
        session = None
    response = page(
        request, "error.html", session, status_code=status, message=message, code=status
    )
    if request.headers.get("hx-request"):
        response.headers["hx-reswap"] = "none"  # htmx shows it in the flash area instead
    return response


def on_collector_error(request: Request, exc: Exception) -> Response:
    """The one place a console error reaches a person: a page, never a traceback."""
    if not isinstance(exc, CollectorError):  # registered for CollectorError only
        return on_crash(request, exc)
    if isinstance(exc, LoginRequiredError):
        target = "/login?next=" + quote(request.url.path, safe="/")
        if request.headers.get("hx-request"):
            return Response(status_code=204, headers={"hx-redirect": target})
        return RedirectResponse(target, status_code=303)
    status = _status(exc)
    if status >= 500:
        logger.error("console: %s %s failed: %s", request.method, request.url.path, exc)
        return _error_page(request, status, "the collector could not answer; see its log")
    return _error_page(request, status, str(exc))


def on_http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        return on_crash(request, exc)
    message = {404: "no such page", 405: "not allowed here"}.get(exc.status_code, exc.detail)
    return _error_page(request, exc.status_code, message)


def on_crash(request: Request, exc: Exception) -> Response:
    """A bug's answer: no traceback, and the security headers all the same (Starlette runs
    this handler outside the middleware that adds them to every other response)."""
    logger.exception("console: %s %s crashed", request.method, request.url.path)
    response = Response(
        "internal error; the collector's log has the details\n",
        status_code=500,
        media_type="text/plain",
    )
    harden(response.headers)
    return response


def home(request: Request) -> Response:
    return RedirectResponse("/alerts", status_code=303)


ROUTES = [
    Route("/", home),
    Route("/login", auth.login_form, methods=["GET"]),
    Route("/login", auth.login, methods=["POST"]),
    Route("/logout", auth.logout, methods=["POST"]),
    Route("/alerts", alerts.alert_list, methods=["GET"]),
    Route("/alerts/bulk", alerts.bulk, methods=["POST"]),
    Route("/alerts/{alert_id:int}", alerts.alert_page, methods=["GET"]),
    Route("/alerts/{alert_id:int}/status", alerts.set_status, methods=["POST"]),
    Route("/alerts/{alert_id:int}/assign", alerts.assign, methods=["POST"]),
    Route("/alerts/{alert_id:int}/notes", alerts.add_note, methods=["POST"]),
    Route("/alerts/{alert_id:int}/export", alerts.export, methods=["POST"]),
    Route("/events", events.event_search, methods=["GET"]),
    Route("/agents", admin.agents, methods=["GET"]),
    Route("/agents/{agent_id}/revoke", admin.revoke_confirm, methods=["GET"]),
    Route("/agents/{agent_id}/revoke", admin.revoke, methods=["POST"]),
    Route("/users", admin.users, methods=["GET"]),
    Route("/users", admin.add_user, methods=["POST"]),
    Route("/users/{name}/lock", admin.lock_user, methods=["POST"]),
    Route("/users/{name}/unlock", admin.unlock_user, methods=["POST"]),
    Route("/rules", rules.rules_page, methods=["GET"]),
    Route("/audit", admin.audit, methods=["GET"]),
    Mount("/static", StaticFiles(directory=STATIC), name="static"),
]


def create_app(console: Console) -> Starlette:
    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={
            CollectorError: on_collector_error,
            HTTPException: on_http_error,
            Exception: on_crash,
        },
    )
    app.state.console = console
    return app
