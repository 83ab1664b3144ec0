"""Signing in and out of the console.

    GET/POST /login, POST /logout -> collector.users (Argon2id, failures counted, trail)

The login form has no session yet, so its CSRF token is a double submit: a random
value in a `__Host-` cookie that the form must echo. Failed attempts are answered only
after `Users.login_delay`, which grows with recent failures of the name or address.
"""

from __future__ import annotations

import asyncio

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from collector.errors import AuthError, ThrottledError
from collector.users import Role, Session
from collector.web import filters, security
from collector.web.context import console_of, current_session, guarded, page, redirect


def _next(value: str) -> str:
    """Where to go after signing in: only a path on this site (no //host, no scheme)."""
    if value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/alerts"


def _form(request: Request, error: str = "", status_code: int = 200, name: str = "") -> Response:
    token = security.new_login_token()
    nobody = not console_of(request).users.list()
    next_url = _next(request.query_params.get("next", "/alerts"))
    response = page(
        request, "login.html", None, status_code=status_code, login_token=token,
        error=error, name=name, no_users=nobody, next_url=next_url,
    )  # fmt: skip
    security.set_login_cookie(response, token)
    return response


def login_form(request: Request) -> Response:
    if current_session(request) is not None:
        return redirect("/alerts")
    return _form(request)


async def login(request: Request) -> Response:
    form = await request.form(max_files=0, max_fields=20)
    try:
        return await _login(request, form)
    finally:
        await form.close()


async def _login(request: Request, form: FormData) -> Response:
    security.check_origin(request)
    security.check_csrf(
        request.cookies.get(security.LOGIN_COOKIE, ""), security.sent_token(request, form)
    )
    console = console_of(request)
    name = filters.text(form, "name")
    raw_password = form.get("password")
    password = raw_password if isinstance(raw_password, str) else ""
    client = request.client.host if request.client else "unknown"
    delay = await run_in_threadpool(console.users.login_delay, name, client, console.clock())
    if delay:
        await asyncio.sleep(delay)  # slows a guesser; other requests are served meanwhile
    try:
        user = await run_in_threadpool(
            lambda: console.users.authenticate(
                name, password, now_ns=console.clock(), client=client
            )
        )
    except ThrottledError as e:
        return await run_in_threadpool(_form, request, str(e), 429, name)
    except AuthError as e:
        return await run_in_threadpool(_form, request, str(e), 401, name)
    old = request.cookies.get(security.COOKIE)
    if old:
        await run_in_threadpool(console.sessions.destroy, old)
    session = await run_in_threadpool(
        lambda: console.sessions.create(user.name, now_ns=console.clock())
    )
    # Sessions abandoned without signing out are refused by `get` but stay in the table
    # until presented again; each login sweeps them out.
    await run_in_threadpool(console.sessions.purge, console.clock())
    response = redirect(_next(filters.text(form, "next")))
    security.set_session_cookie(response, session.id)
    response.delete_cookie(security.LOGIN_COOKIE, path="/", secure=True, httponly=True)
    return response


@guarded(Role.VIEWER)
def logout(request: Request, session: Session, form: FormData) -> Response:
    console = console_of(request)
    console.sessions.destroy(session.id, now_ns=console.clock())
    response = redirect("/login")
    security.clear_session_cookie(response)
    return response
