"""Console fixtures: a store with real signed evidence, console users, an app and clients.

Alerts come from the ingest path (real Ed25519-signed batches through `Ingestor.upload`),
two of their files named by an attacker.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from argon2 import PasswordHasher
from starlette.applications import Starlette
from starlette.testclient import TestClient

from collector.ingest import Ingestor
from collector.policy import load_policy, parse_policy
from collector.store import SqliteStore
from collector.web.app import build_console, create_app
from collector.web.context import Console
from exfilwatch.v1 import events_pb2
from tests.collector.batches import T0, BatchChain, enroll, make_event, new_agent
from tests.conftest import POLICY

PASSWORD = "correct horse battery staple"  # noqa: S105 (test users only)
USERS = {"ada": "admin", "sam": "analyst", "vic": "viewer", "ann": "analyst"}
ORIGIN = "https://testserver"
HOSTILE = (b"<img src=x onerror=alert(1)>.docx", b'"><script>alert(2)</script>.xlsx')
"""File names an insider chose to attack the console."""
_TOKEN = re.compile(r'name="csrf-token" content="([^"]*)"')
_FORM_TOKEN = re.compile(r'name="csrf" value="([^"]*)"')


def seed_alert(store: SqliteStore, *, files: int = 25, hostile: bool = True) -> int:
    """Upload `files` signed copy events of alice's to USB; returns the alert they raise."""
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, load_policy(POLICY))
    chain = BatchChain(agent)
    events = chain.events(files)
    if hostile:
        for i, name in enumerate(HOSTILE):
            src = events_pb2.FileRef(path=b"/home/alice/" + name, size=4096, sha256="c" * 64)
            dst = events_pb2.FileRef(path=b"/media/alice/KINGSTON/" + name, size=4096,
                                     sha256="c" * 64)  # fmt: skip
            events[i] = make_event(
                seq=events[i].seq, observed_at_ns=events[i].observed_at_ns, source=src,
                destination=dst,
            )  # fmt: skip
    for start in range(0, files, 10):
        ingest.upload(chain.next(events[start : start + 10]).raw, agent.agent_id, T0 + 10**12)
    alerts = [a for a in store.list_alerts() if a.rule == "bulk-copy-to-usb"]
    assert alerts, "the seeded copies raised no alert"
    return int(alerts[0].alert_id)


@dataclass
class Web:
    store: SqliteStore
    console: Console
    app: Starlette
    alert_id: int

    def client(self) -> TestClient:
        return TestClient(
            self.app, base_url=ORIGIN, headers={"origin": ORIGIN}, follow_redirects=False
        )


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    db = tmp_path / "collector.db"
    store = SqliteStore.open(db)
    # Argon2id still, with test-sized parameters: four users and their logins per test.
    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    console = build_console(store, load_policy(POLICY), db, hasher=hasher)
    try:
        now = time.time_ns()
        for name, role in USERS.items():
            console.users.add(name, role, PASSWORD, actor="cli:test", now_ns=now)
        alert_id = seed_alert(store)
        yield Web(store, console, create_app(console), alert_id)
    finally:
        console.reader.close()
        store.close()


def page_token(html: str) -> str:
    """The session's CSRF token from a page's <meta name="csrf-token">."""
    found = _TOKEN.search(html)
    assert found and found.group(1), "page carries no CSRF token"
    return found.group(1)


def login(client: TestClient, name: str, password: str = PASSWORD) -> str:
    """Sign in through the login form; returns the session's CSRF token."""
    form = client.get("/login")
    assert form.status_code == 200
    found = _FORM_TOKEN.search(form.text)
    assert found
    r = client.post("/login", data={"name": name, "password": password, "csrf": found.group(1)})
    assert r.status_code == 303, r.text
    return page_token(client.get("/alerts").text)


@pytest.fixture
def signed_in(web: Web) -> Iterator[tuple[TestClient, str]]:
    """An analyst's client and CSRF token."""
    with web.client() as client:
        yield client, login(client, "sam")


# -- long rules: cumulative, baseline and risk alerts from real signed batches ---------

DAY = 86_400 * 10**9
LONG_NOW = T0 + 30 * DAY
"""The long-rule console's clock: a month after the first leak."""
HOSTILE_USER = "<img src=x onerror=alert(4)>"
"""A login name an insider chose (the agent reports whatever the OS says)."""
HOSTILE_RULE = '"><script>alert(3)</script>'
"""A rule name as a careless (or hostile) policy author wrote it."""
LONG_POLICY = f"""
labels: [public, internal, confidential, secret]
rules:
  - {{name: bulk-copy-to-share, match: {{min_label: internal, destinations: [network_share]}},
     group_by: [user], window: 10m, threshold: {{files: 20}}, severity: high}}
long_rules:
  - name: trickle-30d
    kind: cumulative
    match: {{min_label: confidential, destinations: [removable]}}
    measure: distinct_files
    window: 30d
    tiers: {{medium: 4, high: 8}}
  - name: '{HOSTILE_RULE}'
    kind: baseline
    match: {{min_label: confidential, destinations: [removable]}}
    bucket: 7d
    history: 28d
    floor: 3
    min_history_active_days: 14
  - name: risk
    kind: risk
    match: {{min_label: confidential, destinations: [removable]}}
    base_by_label: {{confidential: 5, secret: 10}}
    destination_factor: {{removable: 2}}
    indicators: {{first_seen_device: 10}}
    half_life: 14d
    tiers: {{medium: 40, high: 80, critical: 400}}
"""


def leak(
    ingest: Ingestor, chain: BatchChain, day: int, n: int, first: int, user: str = "alice"
) -> None:
    """`n` distinct confidential documents of `user`'s to the USB stick on `day`, one batch."""
    events = []
    for i in range(n):
        chain.event_seq += 1
        name = f"/media/alice/KINGSTON/doc{first + i}.docx".encode()
        events.append(make_event(
            seq=chain.event_seq, observed_at_ns=T0 + day * DAY + i * 10**9,
            destination=events_pb2.FileRef(path=name, size=1000 + first + i,
                                           sha256=f"{first + i:064x}"),
            user=events_pb2.UserInfo(login=user, effective=user, uid=1000),
        ))  # fmt: skip
    ingest.upload(chain.next(events).raw, chain.agent.agent_id, T0 + day * DAY + 3600 * 10**9)


def burst(ingest: Ingestor, chain: BatchChain, day: int, n: int, user: str) -> None:
    """`n` internal files of `user`'s to a network share within a minute: a burst."""
    events = []
    for i in range(n):
        chain.event_seq += 1
        name = f"/mnt/share/q{i}.xlsx".encode()
        events.append(make_event(
            seq=chain.event_seq, observed_at_ns=T0 + day * DAY + i * 10**9, label="internal",
            destination=events_pb2.FileRef(path=name, size=5000, sha256=f"{500 + i:064x}"),
            destination_class=events_pb2.DESTINATION_CLASS_NETWORK_SHARE, device=None,
            user=events_pb2.UserInfo(login=user, effective=user, uid=1001),
        ))  # fmt: skip
    ingest.upload(chain.next(events).raw, chain.agent.agent_id, T0 + day * DAY + 3600 * 10**9)


def benign(ingest: Ingestor, chain: BatchChain, day: int, users: int) -> None:
    """One public (never matching) copy each of `users` other people: users seen."""
    events = []
    for i in range(users):
        chain.event_seq += 1
        login = f"user{i:02d}"
        events.append(make_event(
            seq=chain.event_seq, observed_at_ns=T0 + day * DAY + i * 10**9, label="public",
            user=events_pb2.UserInfo(login=login, effective=login, uid=2000 + i),
        ))  # fmt: skip
    ingest.upload(chain.next(events).raw, chain.agent.agent_id, T0 + day * DAY + 3600 * 10**9)


@dataclass
class LongWeb(Web):
    alerts: dict[tuple[str, str], int]
    """(rule, user) -> the alert the leaks raised."""


@pytest.fixture
def long_web(tmp_path: Path) -> Iterator[LongWeb]:
    """A console whose policy has long rules, on a store where alice copied three
    documents a week for four weeks and HOSTILE_USER five in two days, among ten
    benign users; and bob's burst to a network share (`alert_id`)."""
    db = tmp_path / "collector.db"
    store = SqliteStore.open(db)
    policy = parse_policy(yaml.safe_load(LONG_POLICY), "long-test")
    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    console = build_console(store, policy, db, hasher=hasher, clock=lambda: LONG_NOW)
    try:
        for name, role in USERS.items():
            console.users.add(name, role, PASSWORD, actor="cli:test", now_ns=LONG_NOW)
        agent = new_agent()
        enroll(store, agent)
        ingest = Ingestor(store, policy)
        chain = BatchChain(agent)
        for week in range(4):
            leak(ingest, chain, week * 7, 3, first=week * 3)
            if week == 0:
                benign(ingest, chain, 1, 10)
                burst(ingest, chain, 2, 20, "bob")
        leak(ingest, chain, 20, 2, first=100, user=HOSTILE_USER)
        leak(ingest, chain, 21, 3, first=102, user=HOSTILE_USER)
        alerts = {(a.rule, dict(a.group)["user"]): int(a.alert_id) for a in store.list_alerts()}
        first = alerts.pop(("bulk-copy-to-share", "bob"))
        yield LongWeb(store, console, create_app(console), first, alerts)
    finally:
        console.reader.close()
        store.close()
