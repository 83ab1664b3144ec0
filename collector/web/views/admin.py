"""Agents, console users and the audit trail.

GET /agents, GET|POST /agents/{id}/revoke (admin, confirmed) -> store.revoke_agent + trail
GET /users, POST /users, POST /users/{name}/lock|unlock (admin) -> collector.users
GET /audit (analysts and admins) -> collector.trail (entries, newest first; the chain
verified on each visit)
"""

from __future__ import annotations

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from collector.errors import NotFoundError
from collector.users import Role, Session
from collector.web import filters
from collector.web.context import console_of, guarded, page, redirect, signed_in
from collector.web.errors import BadRequestError
from collector.web.security import require

AUDIT_PER_PAGE = 100


def agents(request: Request) -> Response:
    session = signed_in(request)
    console = console_of(request)
    paging = filters.PageRequest.parse(request.query_params, default_size=100)
    rows, total = console.reader.agents(paging)
    return page(
        request, "agents.html", session, agents=rows, total=total, paging=paging,
        pages=paging.pages(total), policy_revision=console.policy.revision,
        silent_after_ns=console.policy.agents.silent_after_ns,
    )  # fmt: skip


def _agent_id(request: Request) -> str:
    agent_id = str(request.path_params["agent_id"])
    if console_of(request).reader.agent(agent_id) is None:
        raise NotFoundError(f"no agent {agent_id}")
    return agent_id


def revoke_confirm(request: Request) -> Response:
    """A page that asks before revoking: the form on it is the only way to revoke."""
    session = signed_in(request)
    require(session, Role.ADMIN)
    agent = console_of(request).reader.agent(_agent_id(request))
    return page(request, "revoke.html", session, agent=agent)


@guarded(Role.ADMIN)
def revoke(request: Request, session: Session, form: FormData) -> Response:
    console = console_of(request)
    agent_id = _agent_id(request)
    if filters.text(form, "confirm") != agent_id:
        raise BadRequestError("type the agent id to confirm the revocation")
    console.store.revoke_agent(agent_id)
    # After the change, not in its transaction (the store's revoke has its own): a failed
    # revoke leaves no entry claiming it happened.
    console.trail.append(
        None, actor=session.user, action="agent_revoke", target=f"agent:{agent_id}",
        detail={}, now_ns=console.clock(),
    )  # fmt: skip
    return redirect("/agents")


def users(request: Request) -> Response:
    session = signed_in(request)
    require(session, Role.ADMIN)
    return page(request, "users.html", session, users=console_of(request).users.list())


@guarded(Role.ADMIN)
def add_user(request: Request, session: Session, form: FormData) -> Response:
    console = console_of(request)
    password = form.get("password")
    if not isinstance(password, str):
        raise BadRequestError("password: expected text")
    console.users.add(
        filters.text(form, "name"), filters.text(form, "role"), password,
        actor=session.user, now_ns=console.clock(),
    )  # fmt: skip
    return redirect("/users")


@guarded(Role.ADMIN)
def lock_user(request: Request, session: Session, form: FormData) -> Response:
    console = console_of(request)
    name = str(request.path_params["name"])
    if name.lower() == session.user.lower():  # names are unique regardless of case
        raise BadRequestError("you cannot lock yourself out; ask another admin")
    console.users.lock(name, actor=session.user, now_ns=console.clock())
    console.sessions.destroy_user(name)
    return redirect("/users")


@guarded(Role.ADMIN)
def unlock_user(request: Request, session: Session, form: FormData) -> Response:
    console = console_of(request)
    console.users.unlock(str(request.path_params["name"]), actor=session.user,
                         now_ns=console.clock())  # fmt: skip
    return redirect("/users")


def audit(request: Request) -> Response:
    """Analysts and admins only: a failed login's entry names what was typed into the
    name field, which is sometimes the password."""
    session = signed_in(request)
    require(session, Role.ANALYST)
    trail = console_of(request).trail
    params = request.query_params
    before = filters.text(params, "before")
    actor, target = filters.text(params, "actor") or None, filters.text(params, "target") or None
    entries = trail.entries(
        target=target, actor=actor, limit=AUDIT_PER_PAGE + 1,
        before_seq=filters.number(before, "before") if before else None,
    )  # fmt: skip
    more = len(entries) > AUDIT_PER_PAGE
    entries = entries[:AUDIT_PER_PAGE]
    return page(
        request, "audit.html", session, check=trail.verify(),
        notes_check=console_of(request).triage.verify_notes(), entries=entries,
        next_before=entries[-1].seq if more and entries else None,
        actor=actor or "", target=target or "",
    )  # fmt: skip
