"""What every console view shares: its collaborators, the signed-in session, rendering,
and the guarded POST wrapper.

    app (routes) -> views -> **context** (Console, page(), guarded()) -> domain / reads
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from collector import __version__
from collector.models import AlertStatus
from collector.policy import Policy, format_duration
from collector.render import display_path, human_bytes
from collector.store import SqliteStore
from collector.trail import Trail
from collector.triage import Triage
from collector.users import Role, Session, Sessions, Users
from collector.web import security
from collector.web.errors import LoginRequiredError
from collector.web.reads import Reader

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
STATUS_LABELS = {
    AlertStatus.NEW: "new",
    AlertStatus.IN_PROGRESS: "in progress",
    AlertStatus.RESOLVED: "resolved",
    AlertStatus.FALSE_POSITIVE: "false positive",
}


@dataclass(frozen=True)
class Console:
    """The console's collaborators, built once by `collector.web.app.build_console`."""

    store: SqliteStore
    reader: Reader
    users: Users
    sessions: Sessions
    trail: Trail
    triage: Triage
    policy: Policy
    templates: Jinja2Templates
    clock: Callable[[], int]
    """Wall clock in ns (time.time_ns); tests pass their own."""


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _ts(ns: int | None) -> str:
    if not ns:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(ns: int, now_ns: int) -> str:
    if not ns:
        return "never"
    s = max(0, (now_ns - ns) // 10**9)
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    if s < 172800:
        return f"{s // 3600} h ago"
    return f"{s // 86400} days ago"


def _path(raw: bytes | str) -> str:
    """Attacker-chosen names: control characters and invalid UTF-8 escaped (render.py);
    Jinja's autoescape then makes the markup characters text."""
    return display_path(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))


def _status(value: str) -> str:
    try:
        return STATUS_LABELS[AlertStatus(value)]
    except ValueError:
        return value


def make_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        path=_path, size=human_bytes, ts=_ts, status=_status, text=_path, duration=format_duration
    )
    env.globals.update(version=__version__, ago=_ago)
    return Jinja2Templates(env=env)


def current_session(request: Request) -> Session | None:
    """The valid session of this request's cookie, touched; None if none or expired."""
    sid = request.cookies.get(security.COOKIE)
    if not sid or len(sid) > 128:
        return None
    console = console_of(request)
    return console.sessions.get(sid, now_ns=console.clock())


def signed_in(request: Request) -> Session:
    session = current_session(request)
    if session is None:
        raise LoginRequiredError("sign in first")
    return session


def page(
    request: Request,
    template: str,
    session: Session | None,
    status_code: int = 200,
    **context: Any,
) -> Response:
    """Render a page with what the layout needs: who is signed in, their CSRF token, role."""
    console = console_of(request)
    context.update(
        session=session,
        csrf=session.csrf if session is not None else "",
        can_triage=security.allowed(session, Role.ANALYST),
        is_admin=security.allowed(session, Role.ADMIN),
        now_ns=console.clock(),
        path=request.url.path,
    )
    return console.templates.TemplateResponse(request, template, context, status_code=status_code)


def redirect(url: str) -> Response:
    """After a POST: see the result with a GET (303), so a reload never re-posts."""
    return RedirectResponse(url, status_code=303)


Action = Callable[[Request, Session, FormData], Response]


def guarded(role: Role) -> Callable[[Action], Callable[[Request], Awaitable[Response]]]:
    """A POST endpoint: Origin, session, CSRF token and role checked, in that order, before
    the action runs (in a worker thread: the domain layer blocks on SQLite and Argon2).
    The body is read only for a signed-in session from this site: nobody else gets to
    make the console parse a form."""

    def wrap(action: Action) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(action)
        async def endpoint(request: Request) -> Response:
            security.check_origin(request)
            session = await run_in_threadpool(signed_in, request)
            form = await request.form(max_files=0, max_fields=1000)
            try:
                return await run_in_threadpool(_checked, request, session, form)
            finally:
                await form.close()

        def _checked(request: Request, session: Session, form: FormData) -> Response:
            security.check_csrf(session.csrf, security.sent_token(request, form))
            security.require(session, role)
            return action(request, session, form)

        return endpoint

    return wrap
