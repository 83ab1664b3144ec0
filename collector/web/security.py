"""The console's guards: response headers, the session cookie, CSRF, Origin and role checks.

    request -> **security** (headers on every response; on every POST: Origin, CSRF,
    role) -> page or action

Every check runs on the server; a missing button in the page is courtesy, not control.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from collector.users import Role, Session
from collector.web.errors import ForbiddenError

COOKIE = "__Host-exfw_session"
"""`__Host-`: the browser keeps it only if Secure, Path=/ and without Domain, so neither
a sibling host nor a plain-HTTP page can plant or overwrite it."""
LOGIN_COOKIE = "__Host-exfw_login"
"""Holds the login form's CSRF token before there is a session (double submit)."""
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
)
HEADERS: Mapping[str, str] = {
    "content-security-policy": CSP,
    "strict-transport-security": "max-age=31536000",
    "x-content-type-options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on
    # its own form posts, and the Origin check below would refuse them.
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), usb=()",
}
STATIC_PREFIX = "/static/"
MAX_BODY = 256 * 1024
"""Largest request body the console reads. Its biggest honest form is a note of 10,000
characters (percent-encoded 4-byte ones: 120,000 bytes); without a cap, form parsing would
hold up to 1,000 fields of 1 MiB each in memory."""

RANK = {Role.VIEWER: 0, Role.ANALYST: 1, Role.ADMIN: 2}


def harden(headers: MutableHeaders, *, static: bool = False) -> None:
    """Set the headers above, and `Cache-Control: no-store` on everything but the static
    files (pages carry names, evidence and tokens)."""
    for name, value in HEADERS.items():
        headers[name] = value
    if static:
        headers["cache-control"] = "private, max-age=3600"
    else:
        headers["cache-control"] = "no-store"
        headers["pragma"] = "no-cache"


class SecurityHeaders:
    """ASGI middleware: `harden` on every response, and request bodies cut at MAX_BODY.

    Starlette's crash handler (500) sits outside every middleware, so
    `collector.web.app.on_crash` calls `harden` itself.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith(STATIC_PREFIX)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                harden(MutableHeaders(scope=message), static=static)
            await send(message)

        length = Headers(scope=scope).get("content-length", "")
        if length.isascii() and length.isdigit() and int(length) > MAX_BODY:
            await _too_large(scope, receive, send_with_headers)
            return
        received = 0

        async def receive_capped() -> Message:
            # A chunked body has no Content-Length: count what arrives. The error is
            # raised inside the endpoint's form parsing, so the error page answers it.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY:
                    raise HTTPException(413, _TOO_LARGE)
            return message

        await self.app(scope, receive_capped, send_with_headers)


_TOO_LARGE = f"the request is larger than the console accepts ({MAX_BODY // 1024} KiB)"


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    response = PlainTextResponse(_TOO_LARGE + "\n", status_code=413)
    response.headers["connection"] = "close"  # the unread body is not drained
    await response(scope, receive, send)


def own_origin(request: Request) -> str:
    """scheme://host[:port] this request was addressed to (its Host header)."""
    host = request.headers.get("host", "")
    return f"{request.url.scheme}://{host}".lower()


def check_origin(request: Request) -> None:
    """Refuse a state change that a page of another site sent.

    Origin is sent by every current browser on a POST; Referer is the fallback for
    the rare client that omits it. Neither: refused, since a request we cannot place
    is not one a person made in this console.
    """
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        if referer is None:
            raise ForbiddenError("refused: the request carries neither Origin nor Referer")
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    if origin.lower() != own_origin(request):
        raise ForbiddenError("refused: the request came from another site")


def check_csrf(expected: str, sent: str | None) -> None:
    """The token of the session (or login cookie) must come back with the request."""
    if not sent or not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise ForbiddenError("refused: the form's security token is missing or stale; reload")


def sent_token(request: Request, form: Mapping[str, object]) -> str | None:
    """The CSRF token of a request: the htmx header, else the form field."""
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    value = form.get(CSRF_FIELD)
    return value if isinstance(value, str) else None


def allowed(session: Session | None, role: Role) -> bool:
    """Whether the session's role is at least `role` (viewer < analyst < admin)."""
    return session is not None and RANK[session.role] >= RANK[role]


def require(session: Session, role: Role) -> None:
    if not allowed(session, role):
        raise ForbiddenError(f"refused: this needs the {role.value} role")


def set_session_cookie(response: Response, session_id: str) -> None:
    response.set_cookie(COOKIE, session_id, path="/", secure=True, httponly=True, samesite="strict")


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")


def new_login_token() -> str:
    return secrets.token_urlsafe(32)


def set_login_cookie(response: Response, token: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE, token, path="/", secure=True, httponly=True, samesite="strict",
        max_age=3600,
    )  # fmt: skip
