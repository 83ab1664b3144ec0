"""exfilwatch-collector's console commands: users, alert triage (assign, status, note), trail.

The same rules and trail entries as the web console (collector.users, collector.triage,
collector.trail); `collector.cli` adds these parsers and reports errors.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from collector.errors import UserError
from collector.render import display_text
from collector.store import SqliteStore
from collector.trail import Trail, TrailEntry
from collector.triage import Triage
from collector.users import User, Users, check_name, check_role
from collector.views import iso

ArgAdder = Callable[[argparse.ArgumentParser], None]


def default_actor() -> str:
    """Who the trail names for a command line change: "cli:" and the OS user."""
    try:
        return "cli:" + getpass.getuser()
    except (OSError, KeyError):  # no name for this uid
        return f"cli:uid{os.getuid()}"


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[SqliteStore]:
    from collector.cli import open_store  # here: collector.cli imports this module

    store = open_store(args.data)
    try:
        yield store
    finally:
        store.close()


def read_password(args: argparse.Namespace) -> str:
    """The new password: one line of stdin with --password-stdin, else typed twice."""
    if args.password_stdin:
        line = sys.stdin.readline()
        return line.removesuffix("\n").removesuffix("\r")
    if not sys.stdin.isatty():
        raise UserError("no terminal to read the password from; use --password-stdin")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != first:
        raise UserError("the two passwords differ")
    return first


def _user_json(u: User) -> dict[str, object]:
    return {
        "name": u.name,
        "role": u.role.value,
        "locked": u.locked,
        "created_at": iso(u.created_at_ns),
        "last_login": iso(u.last_login_ns),
    }


def cmd_users_add(args: argparse.Namespace, out: TextIO) -> int:
    check_name(args.name)  # before the password is typed
    check_role(args.role)
    password = read_password(args)
    with _store(args) as store:
        user = Users(store).add(
            args.name, args.role, password, actor=args.actor, now_ns=time.time_ns()
        )
    out.write(f"added {user.name} ({user.role})\n")
    return 0


def cmd_users_password(args: argparse.Namespace, out: TextIO) -> int:
    password = read_password(args)
    with _store(args) as store:
        Users(store).set_password(args.name, password, actor=args.actor, now_ns=time.time_ns())
    out.write(f"password of {args.name} replaced; their sessions ended\n")
    return 0


def cmd_users_lock(args: argparse.Namespace, out: TextIO) -> int:
    with _store(args) as store:
        users = Users(store)
        change = users.lock if args.lock else users.unlock
        user = change(args.name, actor=args.actor, now_ns=time.time_ns())
    out.write(f"{user.name}: {'locked, sessions ended' if user.locked else 'unlocked'}\n")
    return 0


def cmd_users_list(args: argparse.Namespace, out: TextIO) -> int:
    with _store(args) as store:
        users = Users(store).list()
    if args.json:
        for u in users:
            out.write(json.dumps(_user_json(u), sort_keys=True) + "\n")
        return 0
    for u in users:
        state = "LOCKED" if u.locked else "active"
        out.write(
            f"{u.name}  {u.role:<7}  {state:<6}  last login {iso(u.last_login_ns) or 'never'}\n"
        )
    if not users:
        out.write("no users; add one: exfilwatch-collector users add NAME --role admin\n")
    return 0


def cmd_alerts_assign(args: argparse.Namespace, out: TextIO) -> int:
    if (args.user is None) == (not args.none):
        raise UserError("name a user to assign to, or --none to unassign")
    with _store(args) as store:
        alert = Triage(store, Trail(store)).assign(
            args.id, args.user, actor=args.actor, now_ns=time.time_ns()
        )
    who = display_text(alert.assignee) if alert.assignee else "nobody"
    out.write(f"alert #{alert.alert_id} assigned to {who}\n")
    return 0


def cmd_alerts_status(args: argparse.Namespace, out: TextIO) -> int:
    with _store(args) as store:
        alert = Triage(store, Trail(store)).set_status(
            args.id, args.status, actor=args.actor, reason=args.reason, now_ns=time.time_ns()
        )
    out.write(f"alert #{alert.alert_id} is {alert.status}\n")
    return 0


def cmd_alerts_note(args: argparse.Namespace, out: TextIO) -> int:
    with _store(args) as store:
        note = Triage(store, Trail(store)).add_note(
            args.id, args.text, actor=args.actor, now_ns=time.time_ns()
        )
    out.write(f"note #{note.note_id} added to alert #{note.alert_id}\n")
    return 0


def trail_json(e: TrailEntry) -> dict[str, object]:
    return {
        "seq": e.seq,
        "at": iso(e.at_ns),
        "at_ns": e.at_ns,
        "actor": e.actor,
        "action": e.action,
        "target": e.target,
        "detail": dict(e.detail),
        "prev_hash": e.prev_hash.hex(),
        "hash": e.hash.hex(),
    }


def trail_line(e: TrailEntry) -> str:
    detail = json.dumps(dict(e.detail), sort_keys=True, ensure_ascii=False)
    return (
        f"{e.seq:>6}  {iso(e.at_ns) or '-'}  {display_text(e.actor)}  {display_text(e.action)}  "
        f"{display_text(e.target)}  {display_text(detail)}"
    )


def cmd_trail_list(args: argparse.Namespace, out: TextIO) -> int:
    with _store(args) as store:
        entries = Trail(store).entries(
            target=args.target, actor=args.by, limit=args.limit, before_seq=args.before
        )
    for e in entries:
        out.write(
            (json.dumps(trail_json(e), sort_keys=True) if args.json else trail_line(e)) + "\n"
        )
    if not entries and not args.json:
        out.write("no trail entries\n")
    return 0


def cmd_trail_verify(args: argparse.Namespace, out: TextIO) -> int:
    with _store(args) as store:
        trail = Trail(store)
        check = trail.verify()
        notes = Triage(store, trail).verify_notes()
        bad = None
        if check.first_bad_seq is not None:
            found = trail.entries(limit=1, before_seq=check.first_bad_seq + 1)
            bad = found[0] if found else None
    if not check.ok:
        out.write(f"FAIL {check.message}\n")
        if bad is not None:
            out.write(f"first bad entry: {trail_line(bad)}\n")
    for problem in notes.problems:  # notes edited behind the trail's back (their digests)
        out.write(f"FAIL {display_text(problem)}\n")
    if not check.ok:
        out.write(f"trail: {check.count} entries, the chain is broken\n")
        return 1
    if not notes.ok:
        out.write(f"trail: {check.message}; {len(notes.problems)} note(s) do not match it\n")
        return 1
    out.write(f"trail: {check.message}\n")
    return 0


def add_alert_commands(
    alerts: argparse._SubParsersAction[argparse.ArgumentParser], data_arg: ArgAdder
) -> None:
    """`alerts assign | status | note` on the existing `alerts` command."""
    p = alerts.add_parser("assign", help="give an alert to an analyst or admin (or --none)")
    data_arg(p)
    _actor_arg(p)
    p.add_argument("id", type=int)
    p.add_argument("user", nargs="?", help="an unlocked analyst or admin")
    p.add_argument("--none", action="store_true", help="unassign")
    p.set_defaults(func=cmd_alerts_assign)

    p = alerts.add_parser(
        "status", help="new -> in_progress -> resolved | false_positive; reopen to in_progress"
    )
    data_arg(p)
    _actor_arg(p)
    p.add_argument("id", type=int)
    p.add_argument("status", choices=["new", "in_progress", "resolved", "false_positive"])
    p.add_argument("--reason", help="why (required to resolve or mark false positive)")
    p.set_defaults(func=cmd_alerts_status)

    p = alerts.add_parser("note", help="append a note to an alert (notes are never edited)")
    data_arg(p)
    _actor_arg(p)
    p.add_argument("id", type=int)
    p.add_argument("text")
    p.set_defaults(func=cmd_alerts_note)


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    data_arg: ArgAdder,
    json_arg: ArgAdder,
) -> None:
    """The `users` and `trail` commands."""
    users = sub.add_parser("users", help="console users").add_subparsers(dest="sub", required=True)
    p = users.add_parser("add", help="add a console user (password asked twice, not echoed)")
    data_arg(p)
    _actor_arg(p)
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=["admin", "analyst", "viewer"])
    _password_arg(p)
    p.set_defaults(func=cmd_users_add)
    p = users.add_parser("password", help="replace a user's password")
    data_arg(p)
    _actor_arg(p)
    p.add_argument("name")
    _password_arg(p)
    p.set_defaults(func=cmd_users_password)
    for name, lock, text in (
        ("lock", True, "lock a user out and end their sessions (users are never deleted)"),
        ("unlock", False, "let a locked user log in again"),
    ):
        p = users.add_parser(name, help=text)
        data_arg(p)
        _actor_arg(p)
        p.add_argument("name")
        p.set_defaults(func=cmd_users_lock, lock=lock)
    p = users.add_parser("list")
    data_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_users_list)

    trail = sub.add_parser("trail", help="who did what in the console and CLI").add_subparsers(
        dest="sub", required=True
    )
    p = trail.add_parser("list", help="trail entries, newest first")
    data_arg(p)
    json_arg(p)
    p.add_argument("--target", help="only entries about this, e.g. alert:12 or user:alice")
    p.add_argument("--by", help="only entries by this actor")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--before", type=int, metavar="SEQ", help="entries older than SEQ")
    p.set_defaults(func=cmd_trail_list)
    p = trail.add_parser("verify", help="check the trail's hash chain (exit 1 if broken)")
    data_arg(p)
    p.set_defaults(func=cmd_trail_verify)


def _actor_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--actor",
        default=default_actor(),
        help="who the trail names (default: cli: and your OS user name)",
    )


def _password_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password from one line of stdin"
    )
