"""Crash matrix (issue 4, "Delivery without loss"): real agent and collector processes are
killed, restarted, starved and cut off while labelled files are being copied; afterwards
the events the collector stored are exactly the events the agent produced.

"Produced" is read from the agent's spool, not from its log: the spool numbers every
event it accepts (seq 1, 2, ...) in the transaction that stores it, so after a clean
final stop with an empty spool, the agent produced seqs 1..next_event_seq-1. The
collector must hold each of those exactly once, in exactly one batch. The agent's
"spooled event <id>" log lines are checked against that too; see `check_log`.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import random
import re
import selectors
import shutil
import signal
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.identity import SPOOL
from exfilwatch.v1.events_pb2 import EventBatch
from tests.e2e.conftest import AgentFactory, set_label
from tests.procs import Agent, Collector, wait_until

pytestmark = pytest.mark.slow

LEVELS = ("public", "internal", "confidential", "secret")
SPOOLED = re.compile(r" spooled event ([0-9a-f-]{36}) (\w+)$")
DUPLICATE_ACK = re.compile(r" batch (\d+) acknowledged \(\d+ events, duplicate\)$", re.M)
EMITTING_THREADS = 3
"""Threads of the agent that call `AgentService.emit`: the main thread (agent_start, the
startup rescan, spool-drop gaps) and the two pipeline workers. emit() appends, then logs;
each thread can be killed between the two with at most one event."""


# -- what the collector stored, what the agent produced --------------------------------


@dataclass(frozen=True)
class StoredEvent:
    event_id: str
    seq: int
    action: str
    label: str
    dest: bytes
    gap_reason: str
    gap_count: int


def stored_events(db: Path) -> list[StoredEvent]:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        rows = con.execute(
            "SELECT event_id, seq, action, label, dest_path, gap_reason, gap_count FROM events"
        ).fetchall()
    return [StoredEvent(*row) for row in rows]


def stored_count(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        return int(con.execute("SELECT count(*) FROM events").fetchone()[0])


def ids_per_batch(db: Path) -> Counter[str]:
    """How many stored batches carry each event id (the signed bytes, not the events table,
    whose primary key would hide an event the agent sealed twice)."""
    counts: Counter[str] = Counter()
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        for (body,) in con.execute("SELECT body FROM batches"):
            counts.update(e.event_id for e in EventBatch.FromString(body).events)
    return counts


@dataclass(frozen=True)
class SpoolState:
    pending: int
    sealed: int
    next_event_seq: int


def spool_state(state_dir: Path) -> SpoolState:
    """Read the spool of a stopped agent (it holds an exclusive lock while it runs)."""
    with contextlib.closing(sqlite3.connect(state_dir / SPOOL, timeout=0)) as con:
        (pending,) = con.execute("SELECT count(*) FROM pending").fetchone()
        (sealed,) = con.execute("SELECT count(*) FROM batches").fetchone()
        (next_seq,) = con.execute("SELECT next_event_seq FROM meta").fetchone()
    return SpoolState(pending, sealed, next_seq)


def spooled(log: Path) -> list[tuple[str, str]]:
    """(event id, action) of every complete "spooled event" line, across all runs."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = SPOOLED.search(line)
        if match:
            found.append((match.group(1), match.group(2)))
    return found


# -- the rig: files, a copier, and an agent whose runs are recorded --------------------


def make_sources(folder: Path, n: int) -> list[Path]:
    """`n` small files with distinct contents, labelled round-robin with every level."""
    sources = []
    for i in range(n):
        path = folder / f"src{i:03d}.docx"
        path.write_bytes(f"document {i} ".encode() * (40 + 7 * i))
        set_label(path, LEVELS[i % len(LEVELS)])
        sources.append(path)
    return sources


class Copier:
    """Copies the sources round-robin into `dest` at `rate` copies/s, in its own thread.

    The pace spreads the copies over the scenario; it synchronises nothing.
    """

    def __init__(self, sources: list[Path], dest: Path, n: int, rate: float, first: int = 0):
        self.names = [
            dest / f"copy{i:05d}{sources[i % len(sources)].suffix}" for i in range(first, first + n)
        ]
        self._sources = sources
        self._first = first
        self._rate = rate
        self._stop = threading.Event()
        self.done = threading.Event()
        self.copied = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="copier")

    def __enter__(self) -> Copier:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error

    def _run(self) -> None:
        try:
            start = time.monotonic()
            for k, name in enumerate(self.names):
                if self._stop.wait(max(0.0, start + k / self._rate - time.monotonic())):
                    return
                shutil.copy(self._sources[(self._first + k) % len(self._sources)], name)
                self.copied += 1
        except BaseException as e:
            self.error = e
        finally:
            self.done.set()

    def wait(self, timeout: float) -> None:
        assert self.done.wait(timeout), f"copier still running after {timeout} s"
        if self.error is not None:
            raise self.error

    def made(self) -> list[Path]:
        """The copies made so far."""
        return self.names[: self.copied]


@dataclass
class Rig:
    collector: Collector
    agent: Agent
    state: Path
    usb: Path
    sources: list[Path]
    rng: random.Random
    runs: list[bool] = field(default_factory=list)
    """One entry per agent run, in launch order: True if it was killed with SIGKILL."""
    unlogged: int = 0
    """Stored events whose "spooled event" line a SIGKILL cut (see `check_log`)."""

    @property
    def db(self) -> Path:
        return self.collector.data / "collector.db"

    def stored(self) -> int:
        return stored_count(self.db)

    def start_agent(self) -> None:
        self.agent.start()
        self.runs.append(False)

    def launch_agent(self) -> None:
        """Start the agent without waiting until it runs."""
        self.agent.launch()
        self.runs.append(False)

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        rc = self.agent.stop(sig)
        assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 0), self.agent.log
        self.runs[-1] = sig == signal.SIGKILL

    def delivered(self, timeout: float) -> None:
        """Wait until every event the agent has logged so far is stored at the collector, or
        was dropped by the spool's byte cap and reported so (a stored coverage_gap)."""

        def check() -> bool:
            logged = {event_id for event_id, _ in spooled(self.agent.log)}
            stored = stored_events(self.db)
            # Drops are reported after they happen: equality means all are reported.
            return len(logged - {e.event_id for e in stored}) <= reported_drops(stored)

        wait_until(check, timeout, "every spooled event stored (or reported dropped)")

    def reported(self, copies: list[Path], timeout: float = 180) -> None:
        """Wait until the collector holds a copy event for each of `copies`."""
        wanted = {os.fsencode(path) for path in copies}

        def check() -> bool:
            return wanted <= {e.dest for e in stored_events(self.db) if e.action == "copy"}

        wait_until(check, timeout, f"copy events for all {len(wanted)} copies")

    def finish(self, timeout: float = 120, *, dropped: bool = False) -> list[StoredEvent]:
        """Deliver everything, stop the agent cleanly, and check exactly-once delivery."""
        for _ in range(3):
            self.delivered(timeout)
            self.stop_agent()
            spool = spool_state(self.state)
            if spool.pending == spool.sealed == 0:
                break
            # The stop's 5 s flush was not enough for the backlog: run once more.
            self.start_agent()
        else:
            raise AssertionError(f"the agent's spool does not drain: {spool}")
        self.delivered(timeout)  # agent_stop
        stored = stored_events(self.db)
        check_exactly_once(self.db, stored, spool.next_event_seq, dropped=dropped)
        self.unlogged = check_log(
            stored, spooled(self.agent.log), self.runs, reported_drops(stored)
        )
        return stored


def check_exactly_once(
    db: Path, stored: list[StoredEvent], next_event_seq: int, *, dropped: bool = False
) -> None:
    """The collector holds every seq the agent's spool ever assigned, once, in one batch;
    or, with `dropped`, every seq but those the spool dropped and reported as dropped."""
    seqs = sorted(e.seq for e in stored)
    assert len(seqs) == len(set(seqs)), "two stored events share a seq"
    missing = sorted(set(range(1, next_event_seq)) - set(seqs))
    reported = reported_drops(stored)
    if dropped:
        assert reported > 0
        assert len(missing) == reported, "the spool_dropped gaps do not count the holes"
    else:
        assert not missing, f"{len(missing)} produced events never stored, e.g. {missing[:10]}"
        assert reported == 0
    assert seqs[-1] == next_event_seq - 1, "stored an event the spool never numbered"
    per_batch = ids_per_batch(db)
    twice = [i for i, n in per_batch.items() if n > 1]
    assert not twice, f"{len(twice)} events sealed into more than one batch"
    assert set(per_batch) == {e.event_id for e in stored}


def reported_drops(stored: list[StoredEvent]) -> int:
    return sum(e.gap_count for e in stored if e.gap_reason == "spool_dropped")


def check_log(
    stored: list[StoredEvent], logged: list[tuple[str, str]], runs: list[bool], dropped: int
) -> int:
    """The agent's log agrees with the store, up to the lines a SIGKILL can cut.

    Every logged event is stored, and logged once, except the `dropped` events the byte
    cap removed after they were spooled. An event stored but not logged was spooled by a
    run killed between emit()'s commit and its log call: at most one per emitting thread,
    and only in runs that ended with SIGKILL. Runs are told apart in seq order by their
    agent_start events, the first thing each run spools. Returns how many stored events
    were not logged.
    """
    by_id = {e.event_id: e for e in stored}
    ids = [event_id for event_id, _ in logged]
    assert len(ids) == len(set(ids)), "an event was logged twice"
    lost = set(ids) - set(by_id)
    assert len(lost) == dropped, f"{len(lost)} spooled events never stored, {dropped} dropped"
    assert all(by_id[i].action == action for i, action in logged if i in by_id)
    # Killed runs come first, then the clean ones (the last, and finish()'s).
    clean = runs.count(False)
    assert runs == [True] * (len(runs) - clean) + [False] * clean
    # A run killed before its agent_start committed spooled nothing: no range of its own.
    starts = sorted(e.seq for e in stored if e.action == "agent_start")
    assert clean <= len(starts) <= len(runs), (len(starts), runs)
    seen = set(ids)
    unlogged = Counter(
        bisect.bisect_right(starts, e.seq) - 1 for e in stored if e.event_id not in seen
    )
    for run, n in unlogged.items():
        assert run < len(starts) - clean, f"a clean run has {n} events it did not log"
        assert n <= EMITTING_THREADS, f"a killed run has {n} events it did not log"
    return sum(unlogged.values())


@pytest.fixture
def rig(collector: Collector, make_agent: AgentFactory, workspace: Path) -> Rig:
    agent = make_agent(start=False)
    seed = random.randrange(1 << 32)
    print(f"random moments drawn with random.Random({seed})")  # shown when a test fails
    return Rig(
        collector=collector,
        agent=agent,
        state=workspace / "agent-state",
        usb=workspace / "usb",
        sources=make_sources(workspace / "sensitive", 40),
        rng=random.Random(seed),
    )


def wait_beyond(
    count: Callable[[], int], above: int, done: threading.Event, timeout: float, what: str
) -> None:
    """Wait until `count()` exceeds `above`, or until `done` is set (the copier finished)."""
    wait_until(lambda: count() > above or done.is_set(), timeout, what)


def coverage(stored: list[StoredEvent], names: list[Path]) -> tuple[int, int]:
    """(copies never reported, copies reported more than once)."""
    reports = Counter(e.dest for e in stored if e.action == "copy")
    counts = [reports[os.fsencode(name)] for name in names]
    return sum(1 for n in counts if n == 0), sum(1 for n in counts if n > 1)


# -- the matrix --------------------------------------------------------------------------


def test_agent_killed_20_times_during_5000_copies(rig: Rig) -> None:
    """kill -9 the agent at 20 random moments of a 5,000-copy run: stored == produced."""
    with Copier(rig.sources, rig.usb, 5000, rate=60) as copier:
        for _ in range(20):
            # Any moment of a run: while Python starts, while the agent opens its spool
            # and rescans (about 2 s with this backlog), or while it copes with copies.
            rig.launch_agent()
            threading.Event().wait(rig.rng.uniform(0.2, 5.0))  # choose the moment
            rig.stop_agent(signal.SIGKILL)
            assert not copier.done.is_set(), "the copies ended before the 20th kill"
        rig.start_agent()
        running_since = time.time()
        copier.wait(120)
    # The last run is never killed: it reports every copy made since it was running.
    rig.reported([p for p in copier.names if p.stat().st_ctime >= running_since])
    stored = rig.finish()
    assert sum(rig.runs) == 20
    # What the kills cost in coverage (not delivery): see the report of issue 4.
    missed, twice = coverage(stored, copier.names)
    print(
        f"5000 copies, 20 agent kills: {missed} copies never reported, {twice} reported twice;"
        f" {rig.unlogged} events stored but not logged"
    )


def test_collector_killed_20_times_during_ingest(rig: Rig) -> None:
    """kill -9 the collector 20 times while it ingests: every copy is stored exactly once."""
    rig.start_agent()
    agents, enroll = rig.collector.agents, rig.collector.enroll
    # Copy until the 20 kills are done, so that every kill falls during ingest.
    with Copier(rig.sources, rig.usb, 100_000, rate=60) as copier:
        for _ in range(20):
            n = rig.rng.randrange(10, 150)
            wait_beyond(rig.stored, rig.stored() + n, copier.done, 60, f"{n} more events stored")
            threading.Event().wait(rig.rng.uniform(0, 0.2))  # choose the moment
            rig.collector.stop(signal.SIGKILL)
            rig.collector.start(listen=agents, enroll=enroll)
    rig.reported(copier.made())
    stored = rig.finish()
    assert len(rig.runs) == 1
    assert coverage(stored, copier.made()) == (0, 0)


def test_collector_down_for_two_minutes(rig: Rig) -> None:
    """Copies go on while the collector is down for two minutes; then everything arrives."""
    rig.start_agent()
    agents, enroll = rig.collector.agents, rig.collector.enroll
    copies = []
    with Copier(rig.sources, rig.usb, 100, rate=50) as copier:
        copier.wait(60)
    copies += copier.names
    rig.delivered(60)
    rig.collector.stop(signal.SIGKILL)
    with Copier(rig.sources, rig.usb, 1200, rate=10, first=100) as copier:
        copier.wait(180)  # the outage lasts as long as these copies: two minutes
    copies += copier.names
    rig.collector.start(listen=agents, enroll=enroll)
    with Copier(rig.sources, rig.usb, 100, rate=50, first=1300) as copier:
        copier.wait(60)
    copies += copier.names
    rig.reported(copies)
    stored = rig.finish()
    assert coverage(stored, copies) == (0, 0)


# -- the agent's connection cut mid-call ---------------------------------------------------


class CuttingProxy:
    """A TCP proxy between the agent and the collector's agent port that cuts connections.

    `cut()` resets every proxied connection. `hold()` stops forwarding the collector's
    replies on the established connections (`withheld` counts what it discarded since): a
    batch committed while its reply is held is one the agent never sees acknowledged, so
    it must resend it. A connection counts as established once the collector has spoken
    twice, each time after the agent (TLS handshake, then HTTP/2 settings); connections
    opened later are not held, so the agent's reconnection is never what stalls.
    One thread runs a selector over the listener and every connection.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._peer: dict[socket.socket, socket.socket] = {}
        self._upstream_side: set[socket.socket] = set()
        self._replies: dict[socket.socket, int] = {}
        """Per upstream socket: how many times the collector spoke after the agent."""
        self._agent_spoke: set[socket.socket] = set()
        self._held: set[socket.socket] = set()
        self.withheld = 0
        """Chunks of replies discarded since the last `hold()`."""
        self._lock = threading.Lock()
        self._commands: list[tuple[str, threading.Event]] = []
        self._stopping = False
        self.cuts = 0
        self._thread = threading.Thread(target=self._run, name="cutting-proxy")

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._command("stop")
        self._thread.join()
        self._sel.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()

    def cut(self) -> None:
        self._command("cut")

    def hold(self) -> int:
        """Hold the replies of every established connection; returns how many it holds."""
        self._command("hold")
        return len(self._held)

    def _command(self, name: str) -> None:
        """Hand `name` to the proxy thread and wait until it has been carried out."""
        done = threading.Event()
        with self._lock:
            self._commands.append((name, done))
        self._wake_w.send(b"x")
        assert done.wait(10), f"proxy did not {name}"

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._sel.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    self._wake_r.recv(4096)
                    self._obey()
                elif sock is self._listener:
                    self._accept()
                elif sock in self._peer:
                    self._pump(sock)
        for sock in list(self._peer):
            self._close(sock)

    def _obey(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for command, done in commands:
            if command == "stop":
                self._stopping = True
            elif command == "hold":
                self._held = {s for s, n in self._replies.items() if n >= 2}
                self.withheld = 0
            elif command == "cut":
                self.cuts += 1
                for sock in list(self._peer):
                    self._close(sock, reset=True)
            done.set()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self._upstream, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, server):
            sock.setblocking(True)
            sock.settimeout(5)
            self._sel.register(sock, selectors.EVENT_READ)
        self._peer[client], self._peer[server] = server, client
        self._upstream_side.add(server)
        self._replies[server] = 0

    def _pump(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._close(sock)
            return
        if sock in self._upstream_side:
            if sock in self._held:
                self.withheld += 1
                return  # a reply the agent will never get
            if sock in self._agent_spoke:
                self._agent_spoke.discard(sock)
                self._replies[sock] += 1
        else:
            self._agent_spoke.add(self._peer[sock])
        try:
            self._peer[sock].sendall(data)
        except OSError:
            self._close(sock)

    def _close(self, sock: socket.socket, *, reset: bool = False) -> None:
        if sock not in self._peer:
            return  # closed with its peer
        for s in (sock, self._peer[sock]):
            self._peer.pop(s)
            self._upstream_side.discard(s)
            self._replies.pop(s, None)
            self._agent_spoke.discard(s)
            self._held.discard(s)
            self._sel.unregister(s)
            if reset:  # RST, not FIN: the connection is cut, not closed
                s.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            s.close()


def test_agent_connection_cut_mid_call(rig: Rig) -> None:
    """Cut the agent's connections 20 times, half of them between a commit and its ack."""
    with CuttingProxy(rig.collector.agents) as proxy:
        config = rig.agent.config
        config.write_text(config.read_text() + f"collector: {proxy.address}\n")
        rig.start_agent()
        holds = 0
        # Copy until the 20 cuts are done, so that every cut falls during delivery.
        with Copier(rig.sources, rig.usb, 100_000, rate=60) as copier:
            for i in range(20):
                # An acknowledgement since the last cut: the agent's connection works again.
                acked = acks(rig.agent.log)
                wait_beyond(lambda: acks(rig.agent.log), acked, copier.done, 60, "an ack")
                # Odd rounds, and even rounds without an established connection: cut now.
                if i % 2 or not proxy.hold():
                    threading.Event().wait(rig.rng.uniform(0, 0.5))  # choose the moment
                    proxy.cut()
                    continue
                # Even rounds: the request went through, the reply is held back; now cut.
                wait_until(lambda: proxy.withheld, 30, "a reply held back")
                holds += 1
                proxy.cut()
        rig.reported(copier.made())
        stored = rig.finish()
    assert coverage(stored, copier.made()) == (0, 0)
    # A batch whose acknowledgement was cut off was resent, byte for byte: the collector
    # acknowledged it as a duplicate (and, as finish() checked, stored nothing twice).
    duplicates = DUPLICATE_ACK.findall(rig.agent.log.read_text())
    assert duplicates, "no batch was resent after its acknowledgement was lost"
    assert proxy.cuts == 20
    print(f"20 cuts ({holds} with the reply held back): {len(duplicates)} duplicate acks")


def acks(log: Path) -> int:
    """How many acknowledgements the agent has logged."""
    return log.read_text(errors="replace").count(" acknowledged (")


def test_spool_full_drops_are_counted_exactly(rig: Rig) -> None:
    """A spool full while the collector is down: the coverage_gap counts equal the holes."""
    config = rig.agent.config
    config.write_text(config.read_text() + "spool: {max_bytes: 40000}\n")
    rig.start_agent()
    agents, enroll = rig.collector.agents, rig.collector.enroll
    rig.delivered(30)
    rig.collector.stop(signal.SIGKILL)
    with Copier(rig.sources, rig.usb, 400, rate=200) as copier:
        copier.wait(60)
    rig.collector.start(listen=agents, enroll=enroll)
    stored = rig.finish(dropped=True)
    labels = Counter(e.label for e in stored if e.action == "copy")
    print("stored copies per label", labels, "dropped", reported_drops(stored))
