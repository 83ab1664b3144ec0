"""Ingest throughput: verified and stored events/s of a real collector, beside raw SQLite.

Starts `collector serve` (configs/policy.yaml, fresh data dir), enrols --agents identities
with `agent enroll`, pre-builds signed batches of --batch realistic copy events per agent
(each agent one hash chain), then sends them over the mutual-TLS agent port from one
thread per agent, one batch in flight per agent, timing first send to last ack. Then it
inserts the same rows into a fresh database with the collector's schema, indexes and
pragmas (executemany, one transaction per batch) and prints both rates and their ratio
as one JSON object on stdout. Progress goes to stderr.

    .venv/bin/python bench/ingest.py [--events 200000] [--agents 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import psutil

from agent import codec
from agent.events import (
    Action,
    AttributionMethod,
    DestinationClass,
    DetectionMethod,
    DeviceInfo,
    Event,
    FileRef,
    ProcessInfo,
    UserInfo,
    event_id_at,
)
from agent.identity import SIGNING_KEY, Identity
from agent.signer import GENESIS_DIGEST, Signer, batch_digest
from bench.common import POLICY, cpu_seconds, enroll, progress, start_collector
from collector import queries
from collector.codec import decode_batch_body
from collector.models import AgentId
from collector.store import BACKSTOP_PAGES, SCHEMA, connection_pragmas
from exfilwatch.v1 import collector_pb2, collector_pb2_grpc

TARGET_EVENTS_PER_S = 40_000
TARGET_RATIO = 0.4
DAY_NS = 86_400 * 10**9
UPLOAD = "/exfilwatch.v1.Collector/UploadBatch"

_PROJECTS = ("q3-forecast", "board", "hr", "m-and-a", "payroll", "roadmap", "legal", "audit")
_EXTS = (".docx", ".xlsx", ".pdf", ".pptx", ".csv", ".zip")


@dataclass(frozen=True)
class Host:
    name: str
    user: str
    uid: int
    serial: str
    heavy: bool


def fleet(n_hosts: int, n_heavy: int, rng: random.Random) -> list[Host]:
    """Workstations, each with its user and USB stick; a few heavy copiers."""
    return [
        Host(
            name=f"ws-{i:05d}",
            user=f"user{i:05d}",
            uid=1000 + i,
            serial=f"{rng.getrandbits(64):016X}",
            heavy=i < n_heavy,
        )
        for i in range(n_hosts)
    ]


def copy_event(host: Host, seq: int, t_ns: int, rng: random.Random) -> Event:
    """One labelled file copied to a USB stick, as the agent reports it."""
    name = f"{rng.choice(_PROJECTS)}-{rng.getrandbits(24):06x}{rng.choice(_EXTS)}"
    project = rng.choice(_PROJECTS)
    src = f"/home/{host.user}/Documents/{project}/{name}".encode()
    dst = f"/media/{host.user}/KINGSTON/{name}".encode()
    size = int(math.exp(rng.uniform(math.log(2_000), math.log(20_000_000))))
    sha = hashlib.sha256(rng.randbytes(16)).hexdigest()
    process = None
    attribution = AttributionMethod.UNATTRIBUTED
    if rng.random() < 0.3:  # psutil finds the copier now and then (FIELD-NOTES 8)
        attribution = AttributionMethod.PROC_SCAN
        pid = rng.randrange(2_000, 400_000)
        process = ProcessInfo(
            pid=pid,
            start_time_ns=t_ns - rng.randrange(10**9),
            exe=b"/usr/bin/cp",
            cmdline=(b"cp", src, dst),
            ppid_chain=(pid - 1, 1),
            name="cp",
        )
    return Event(
        event_id=event_id_at(t_ns, rng.getrandbits(62)),
        observed_at_ns=t_ns,
        action=Action.COPY,
        host=host.name,
        agent_version="0.1.0",
        seq=seq,
        source=FileRef(path=src, size=size, sha256=sha, device=2049, inode=rng.getrandbits(20)),
        label="secret" if rng.random() < 0.3 else "confidential",
        label_source="xattr",
        destination=FileRef(path=dst, size=size, sha256=sha, device=2065, inode=seq),
        destination_class=DestinationClass.REMOVABLE,
        device=DeviceInfo(
            vendor="Kingston",
            model="DataTraveler 50",
            serial=host.serial,
            fs_uuid="4A2B-19C0",
            fs_type="vfat",
            mount_point=f"/media/{host.user}/KINGSTON".encode(),
        ),
        process=process,
        user=UserInfo(login=host.user, effective=host.user, uid=host.uid),
        detection=DetectionMethod.EXACT_HASH,
        attribution=attribution,
    )


@dataclass
class Chain:
    """One enrolled agent identity and its pre-built, signed batches in chain order."""

    identity: Identity
    requests: list[bytes]
    """Serialised SignedBatch messages, batch_seq 1, 2, ..."""
    bodies: list[bytes]
    events: int


def build_chain(
    identity: Identity,
    signer: Signer,
    hosts: list[Host],
    n_events: int,
    batch: int,
    end_ns: int,
    rng: random.Random,
) -> Chain:
    """n_events copy events of `hosts` spread over the day before end_ns, sealed in batches.

    Nine events in ten come from ordinary hosts, one file now and then; one in ten
    from heavy copiers, in bursts of 50 files (these cross the policy's thresholds).
    """
    heavy = [h for h in hosts if h.heavy] or hosts[:1]
    normal = [h for h in hosts if not h.heavy] or hosts
    step = DAY_NS // max(n_events, 1)
    start = end_ns - DAY_NS
    requests: list[bytes] = []
    bodies: list[bytes] = []
    prev = GENESIS_DIGEST
    seq = 0
    for first in range(0, n_events, batch):
        events = []
        for i in range(first, min(first + batch, n_events)):
            seq += 1
            burst = i // 50
            host = heavy[burst // 10 % len(heavy)] if burst % 10 == 0 else rng.choice(normal)
            events.append(codec.event_to_bytes(copy_event(host, seq, start + i * step, rng)))
        batch_seq = len(bodies) + 1
        body = codec.encode_batch(identity.agent_id, batch_seq, prev, time.time_ns(), events)
        requests.append(codec.encode_signed_batch(body, signer.sign_batch(body), signer.key_id()))
        bodies.append(body)
        prev = batch_digest(body)
    return Chain(identity, requests, bodies, n_events)


def send_chain(chain: Chain, ready: threading.Barrier, acks: list[int], errors: list[str]) -> None:
    """Upload the chain in order, one batch in flight; count the events acknowledged."""
    ca, key, cert = chain.identity.tls_material()
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    options = [("grpc.max_send_message_length", 8 * 1024 * 1024)]
    with grpc.secure_channel(chain.identity.target, creds, options=options) as channel:
        upload = channel.unary_unary(
            UPLOAD, request_serializer=None, response_deserializer=collector_pb2.BatchAck.FromString
        )
        # Connect and authenticate before the clock starts: the bench measures ingest,
        # not the TLS handshake.
        collector_pb2_grpc.CollectorStub(channel).Heartbeat(
            collector_pb2.HeartbeatRequest(agent_id=chain.identity.agent_id), timeout=30
        )
        ready.wait()
        stored = 0
        try:
            for request in chain.requests:
                ack = upload(request, timeout=120)
                if ack.duplicate:
                    raise RuntimeError(f"batch {ack.batch_seq} acknowledged as a duplicate")
                stored += ack.events_stored
        except (grpc.RpcError, RuntimeError) as e:
            errors.append(f"{chain.identity.agent_id}: {e}")
        acks.append(stored)


def measure_ingest(chains: list[Chain]) -> tuple[float, int]:
    """Seconds from the first send to the last ack, and events acknowledged as stored."""
    ready = threading.Barrier(len(chains) + 1)
    acks: list[int] = []
    errors: list[str] = []
    threads = [
        threading.Thread(target=send_chain, args=(c, ready, acks, errors), name=f"send-{i}")
        for i, c in enumerate(chains)
    ]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError("upload failed: " + "; ".join(errors))
    return elapsed, sum(acks)


def event_rows(chains: list[Chain]) -> list[list[tuple[object, ...]]]:
    """The collector's events-table rows of every batch, decoded by the collector's codec."""
    rows = []
    for chain in chains:
        agent = AgentId(chain.identity.agent_id)
        for body in chain.bodies:
            events = decode_batch_body(body, agent_id=agent)[3]
            rows.append(list(queries.event_rows(events)))
    return rows


def measure_raw_sqlite(path: Path, chains: list[Chain], synchronous: str) -> tuple[float, int]:
    """Insert the same rows with executemany, one transaction per batch; (seconds, rows).

    Same schema and indexes as the collector (its SCHEMA), same pragmas as its writing
    connection (WAL, the serve path's synchronous level, foreign keys on, page cache,
    autocheckpoint backstop); the parent `batches` rows are inserted beforehand, untimed,
    so the foreign-key checks are real.
    """
    batches = event_rows(chains)
    con = sqlite3.connect(path, isolation_level=None)
    for pragma in connection_pragmas(synchronous, writer=True):
        con.execute(pragma)
    con.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
    for statement in SCHEMA.split(";"):
        if statement.strip():
            con.execute(statement)
    con.execute("BEGIN")
    for chain in chains:
        con.execute(
            "INSERT INTO agents (agent_id, public_key, key_id, hostname, agent_version,"
            " enrolled_at_ns) VALUES (?, ?, ?, '', '', 0)",
            (chain.identity.agent_id, b"", os.urandom(32)),
        )
        con.executemany(
            "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(chain.identity.agent_id, s + 1, b"", b"", b"", b"", b"", 0)
             for s in range(len(chain.bodies))],
        )  # fmt: skip
    con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    t0 = time.perf_counter()
    for rows in batches:
        con.execute("BEGIN IMMEDIATE")
        con.executemany(queries.INSERT_EVENT, rows)
        con.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    n = con.execute("SELECT count(*) FROM events").fetchone()[0]
    con.close()
    return elapsed, n


class CpuWatch:
    """CPU seconds of the collector, of this process (the uploading client) and of the whole
    machine between construction and `stop()`: on a shared 2-core box the rate says little
    without them (other_processes_cores near 0 means the run had the machine to itself)."""

    def __init__(self, collector_pid: int) -> None:
        self._collector = psutil.Process(collector_pid)
        self._client = psutil.Process()
        self._t0 = time.monotonic()
        self._c0 = cpu_seconds(self._collector, children=True)
        self._p0 = cpu_seconds(self._client)
        self._m0 = _busy(psutil.cpu_times())

    def stop(self) -> None:
        self.wall_s = time.monotonic() - self._t0
        self.collector_s = cpu_seconds(self._collector, children=True) - self._c0
        self.client_s = cpu_seconds(self._client) - self._p0
        self.busy_s = _busy(psutil.cpu_times()) - self._m0
        self.other_s = max(0.0, self.busy_s - self.collector_s - self.client_s)


def _busy(t: Any) -> float:
    return float(t.user + t.system + t.irq + t.softirq + t.steal)


def alert_counts(db: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        alerts = con.execute("SELECT count(*) FROM alerts WHERE kind = 'threshold'").fetchone()
        evidence = con.execute("SELECT count(*) FROM alert_events").fetchone()
        events = con.execute("SELECT count(*) FROM events").fetchone()
    finally:
        con.close()
    return {"events_in_db": events[0], "alerts": alerts[0], "evidence_links": evidence[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events to send in total")
    parser.add_argument("--batch", type=int, default=500, help="events per signed batch")
    parser.add_argument("--agents", type=int, default=3, help="parallel agents (one chain each)")
    parser.add_argument("--hosts", type=int, default=10_000, help="workstations in the fleet")
    parser.add_argument("--heavy", type=int, default=30, help="of which heavy copiers")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--decode-workers", type=int, help="the collector's `serve --decode-workers` (default: its)"
    )
    parser.add_argument("--keep", type=Path, help="keep the data in this directory")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="exfilwatch-bench-ingest-") as tmpdir:
        tmp = args.keep or Path(tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        progress(f"starting collector in {tmp}")
        serve_args = []
        if args.decode_workers is not None:
            serve_args = ["--decode-workers", str(args.decode_workers)]
        collector = start_collector(tmp, serve_args=serve_args)
        try:
            hosts = fleet(args.hosts, args.heavy, rng)
            end_ns = time.time_ns()
            chains = []
            per_agent = [args.events // args.agents] * args.agents
            per_agent[0] += args.events - sum(per_agent)
            for a in range(args.agents):
                state = tmp / f"agent{a}-state"
                enroll(collector, state, f"bench-relay-{a}")
                mine = hosts[a :: args.agents]  # each workstation reports through one agent
                progress(f"agent {a}: building {per_agent[a]} events in batches of {args.batch}")
                chains.append(
                    build_chain(
                        Identity.load(state),
                        Signer.load(state / SIGNING_KEY),
                        mine,
                        per_agent[a],
                        args.batch,
                        end_ns,
                        rng,
                    )
                )
            n_batches = sum(len(c.requests) for c in chains)
            wire = sum(map(len, (r for c in chains for r in c.requests)))
            progress(f"sending {args.events} events in {n_batches} batches ({wire} bytes)")
            load_before = os.getloadavg()[0]
            assert collector.proc is not None
            cpu = CpuWatch(collector.proc.popen.pid)
            seconds, stored = measure_ingest(chains)
            cpu.stop()
            load_after = os.getloadavg()[0]
            progress(f"ingest: {stored} events in {seconds:.2f} s")
        finally:
            collector.stop()
        counts = alert_counts(collector.data / "collector.db")
        if stored != args.events or counts["events_in_db"] != args.events:
            raise SystemExit(f"expected {args.events} stored events, got {stored}, {counts}")
        progress("raw SQLite insert of the same rows")
        raw_seconds, raw_rows = measure_raw_sqlite(tmp / "raw.db", chains, "FULL")
        progress(f"raw: {raw_rows} rows in {raw_seconds:.2f} s")

    rate = stored / seconds
    raw_rate = raw_rows / raw_seconds
    ratio = rate / raw_rate
    result = {
        "bench": "ingest",
        "events": stored,
        "batch_size": args.batch,
        "agents": args.agents,
        "decode_workers": args.decode_workers,
        "batches": n_batches,
        "wire_bytes_per_event": round(wire / stored, 1),
        "policy": str(POLICY.relative_to(POLICY.parent.parent)),
        "synchronous": "FULL",
        "ingest_seconds": round(seconds, 3),
        "ingest_events_per_s": round(rate),
        "raw_sqlite_seconds": round(raw_seconds, 3),
        "raw_sqlite_events_per_s": round(raw_rate),
        "ratio": round(ratio, 3),
        **counts,
        "collector_cpu_cores": round(cpu.collector_s / cpu.wall_s, 2),
        "collector_cpu_us_per_event": round(cpu.collector_s / stored * 1e6, 1),
        "client_cpu_cores": round(cpu.client_s / cpu.wall_s, 2),
        "machine_cpu": {
            "busy_cores": round(cpu.busy_s / cpu.wall_s, 2),
            "other_processes_cores": round(cpu.other_s / cpu.wall_s, 2),
        },
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(load_after, 2),
        "cpus": os.cpu_count(),
        "target": {"events_per_s": TARGET_EVENTS_PER_S, "ratio": TARGET_RATIO},
        "met": rate >= TARGET_EVENTS_PER_S and ratio >= TARGET_RATIO,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
