"""Fleet: 500 simulated agents against one real collector: rate, ack latency, memory, reconnect.

Starts `collector serve` (configs/policy.yaml, fresh data dir, port 0 for both ports),
enrols --agents identities with the real Enroll RPC (agent.enroll.enroll, a thread
pool, one multi-use token), then hands them to --workers subprocesses of this script
(`--worker`; started before the parent creates any gRPC object, FIELD-NOTES 2.6). Each
worker opens one mutual-TLS channel per agent (the agent's own key and certificate,
agent.shipper's channel options: 500 connections in all) and drives its agents from a
pool of --threads threads: an agent's signed, hash-chained batches of --batch-events
realistic copy events go out in order, one in flight per agent, each agent back in the
queue as soon as its batch is acknowledged (closed loop: the collector runs flat out).
A failed call keeps the same bytes and retries after agent.shipper.next_delay.

After a --warmup, it measures for --seconds: events stored (rows in the collector's
events table, read-only, at both ends of the interval; and the sum of acknowledged
events), per-call acknowledgement latency (UploadBatch sent -> BatchAck received, after
the collector's durable commit), the collector's resident memory (sampled; peak) and
CPU. Then, once per --reconnect-with item, it restarts the collector (SIGTERM, wait,
`serve` again on the SAME ports) while every agent keeps trying with jittered backoff
(heartbeats only, or its next batch as a busy agent does), and measures the time from the
new collector's "listening" line until every agent has had a successful call again.
Finally it checks that the events stored are exactly those acknowledged (plus, at most,
batches still unacknowledged when it stopped).

Prints one JSON object on stdout; progress goes to stderr.

    .venv/bin/python bench/fleet.py [--agents 500] [--workers 4] [--seconds 45]
        [--batch-events 100] [--threads 8]
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench.common import POLICY, cpu_seconds, percentile, progress
from tests.procs import Collector, Proc

TARGET_EVENTS_PER_S = 20_000
TARGET_P99_MS = 500.0
TARGET_RECONNECT_S = 30.0
UPLOAD = "/exfilwatch.v1.Collector/UploadBatch"
HEARTBEAT = "/exfilwatch.v1.Collector/Heartbeat"
CALL_TIMEOUT_S = 15.0  # agent.shipper.ShipperSettings.call_timeout_s
MAX_BACKOFF_S = 10.0  # agent.shipper.ShipperSettings.max_backoff_s
HEARTBEAT_EVERY_S = 1.0  # heartbeat mode, while the old collector still answers
DAY_NS = 86_400 * 10**9
EVENTS_FIELD_TAG = b"\x2a"  # EventBatch.events: field 5, length-delimited
TEMPLATES_PER_AGENT = 32
HEAVY_EVERY = 50
"""One agent in this many is a heavy copier (a file every 5 s of event time, not every 60 s)."""

_PROJECTS = ("q3-forecast", "board", "hr", "m-and-a", "payroll", "roadmap", "legal", "audit")
_EXTS = (".docx", ".xlsx", ".pdf", ".pptx", ".csv", ".zip")
_VENDORS = (("Kingston", "DataTraveler 50"), ("SanDisk", "Ultra Fit"), ("Samsung", "BAR Plus"))


# Refusals that retrying the same bytes cannot fix (agent.shipper._REFUSED): the agent stops.
_REFUSED = {
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "ALREADY_EXISTS",
    "FAILED_PRECONDITION",
    "INVALID_ARGUMENT",
}

# -- worker: simulated agents ---------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def static_parts(hostname: str, index: int, rng: random.Random) -> list[bytes]:
    """Serialised Event fields 4.. (everything but event_id, seq, observed_at_ns) of copies
    a workstation could report: its user (now and then another), its USB stick, varied
    files, sizes and hashes, labels confidential or secret, sometimes the copying process."""
    from agent import codec
    from agent.events import (
        Action,
        AttributionMethod,
        DestinationClass,
        DetectionMethod,
        DeviceInfo,
        Event,
        EventId,
        FileRef,
        ProcessInfo,
        UserInfo,
    )

    user = f"user{index:05d}"
    vendor, model = _VENDORS[index % len(_VENDORS)]
    serial = f"{rng.getrandbits(64):016X}"
    mount = f"/media/{user}/{vendor.upper()}".encode()
    parts = []
    for _ in range(TEMPLATES_PER_AGENT):
        login = user if rng.random() < 0.9 else f"admin{rng.randrange(20):02d}"
        name = f"{rng.choice(_PROJECTS)}-{rng.getrandbits(24):06x}{rng.choice(_EXTS)}"
        src = f"/home/{user}/Documents/{rng.choice(_PROJECTS)}/{name}".encode()
        dst = mount + b"/" + name.encode()
        size = int(2_000 * 10_000 ** rng.random())  # log-uniform 2 kB .. 20 MB
        sha = rng.randbytes(32).hex()
        process = None
        attribution = AttributionMethod.UNATTRIBUTED
        if rng.random() < 0.3:
            attribution = AttributionMethod.PROC_SCAN
            pid = rng.randrange(2_000, 400_000)
            process = ProcessInfo(
                pid=pid,
                start_time_ns=time.time_ns() - rng.randrange(10**12),
                exe=b"/usr/bin/cp",
                cmdline=(b"cp", src, dst),
                ppid_chain=(pid - 1, 1),
                name="cp",
            )
        msg = codec.encode_event(
            Event(
                event_id=EventId(str(uuid.uuid4())),
                observed_at_ns=1,
                action=Action.COPY,
                host=hostname,
                agent_version="0.1.0",
                seq=1,
                source=FileRef(src, size, sha, device=2049, inode=rng.getrandbits(20)),
                label="secret" if rng.random() < 0.3 else "confidential",
                label_source="xattr",
                destination=FileRef(dst, size, sha, device=2065, inode=rng.getrandbits(16)),
                destination_class=DestinationClass.REMOVABLE,
                device=DeviceInfo(vendor, model, serial, "4A2B-19C0", "vfat", mount),
                process=process,
                user=UserInfo(login=login, effective=login, uid=1000 + index),
                detection=DetectionMethod.EXACT_HASH,
                attribution=attribution,
            )
        )
        for name_ in ("event_id", "seq", "observed_at_ns"):
            msg.ClearField(name_)
        parts.append(msg.SerializeToString(deterministic=True))
    return parts


@dataclass
class SimAgent:
    """One enrolled identity: its channel, its chain, its pending batch and its backoff."""

    index: int
    hostname: str
    state: Path
    start_ns: int
    step_ns: int
    rng: random.Random
    parts: list[bytes] = field(default_factory=list)
    agent_id: str = ""
    signer: Any = None
    channel: Any = None
    upload: Any = None
    heartbeat: Any = None
    batch_seq: int = 0
    """Last acknowledged batch_seq."""
    prev: bytes = bytes(32)
    event_seq: int = 0
    pending: tuple[int, bytes, bytes, int] | None = None
    """(batch_seq, SignedBatch bytes, digest, events) in flight or to retry."""
    attempt: int = 0
    dead: str = ""

    def open(self, options: Any) -> None:
        import grpc

        from agent.identity import SIGNING_KEY, Identity
        from agent.signer import Signer
        from exfilwatch.v1 import collector_pb2

        identity = Identity.load(self.state)
        self.agent_id = identity.agent_id
        self.signer = Signer.load(self.state / SIGNING_KEY)
        ca, key, cert = identity.tls_material()
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        self.channel = grpc.secure_channel(identity.target, creds, options=options)
        self.upload = self.channel.unary_unary(
            UPLOAD,
            request_serializer=None,
            response_deserializer=collector_pb2.BatchAck.FromString,
        )
        self.heartbeat = self.channel.unary_unary(
            HEARTBEAT,
            request_serializer=collector_pb2.HeartbeatRequest.SerializeToString,
            response_deserializer=collector_pb2.HeartbeatResponse.FromString,
        )

    def events(self, n: int) -> list[bytes]:
        """n new events: fresh id, next seq, event time advancing by step_ns (never future)."""
        from agent.events import event_id_at
        from exfilwatch.v1 import events_pb2

        out = []
        latest = time.time_ns() - 10**9
        for _ in range(n):
            self.event_seq += 1
            t = min(self.start_ns + self.event_seq * self.step_ns, latest)
            event_id = event_id_at(t, self.rng.getrandbits(62))
            head = events_pb2.Event(
                event_id=event_id, seq=self.event_seq, observed_at_ns=t
            ).SerializeToString(deterministic=True)
            out.append(head + self.parts[self.rng.randrange(len(self.parts))])
        return out

    def next_batch(self, n_events: int) -> tuple[int, bytes, bytes, int]:
        """Seal the next batch of the chain: the same bytes as agent.codec.encode_batch."""
        from agent import codec
        from agent.signer import batch_digest
        from exfilwatch.v1 import events_pb2

        if self.pending is None:
            seq = self.batch_seq + 1
            header = events_pb2.EventBatch(
                agent_id=self.agent_id,
                batch_seq=seq,
                prev_batch_digest=self.prev,
                sealed_at_ns=time.time_ns(),
            ).SerializeToString(deterministic=True)
            body = header + b"".join(
                EVENTS_FIELD_TAG + _varint(len(ev)) + ev for ev in self.events(n_events)
            )
            request = codec.encode_signed_batch(
                body, self.signer.sign_batch(body), self.signer.key_id()
            )
            self.pending = (seq, request, batch_digest(body), n_events)
        return self.pending


def self_check(agent: SimAgent) -> None:
    """The fast batch builder must produce exactly what the agent's codec would."""
    from agent import codec
    from exfilwatch.v1 import events_pb2

    saved = (agent.event_seq, agent.rng.getstate())
    seq, request, _, _ = agent.next_batch(5)
    agent.pending = None
    agent.event_seq, state = saved
    agent.rng.setstate(state)
    signed = events_pb2.SignedBatch.FromString(request)
    batch = events_pb2.EventBatch.FromString(signed.body)
    events = [ev.SerializeToString(deterministic=True) for ev in batch.events]
    expected = codec.encode_batch(
        agent.agent_id, seq, batch.prev_batch_digest, batch.sealed_at_ns, events
    )
    if expected != signed.body:
        raise SystemExit("fleet worker: batch bytes differ from agent.codec.encode_batch")


class Scheduler:
    """Agents ordered by when they may call next; one agent is held by one thread at a time."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, SimAgent]] = []
        self._cond = threading.Condition()
        self._n = 0
        self.stopping = False

    def put(self, agent: SimAgent, at: float) -> None:
        with self._cond:
            self._n += 1
            heapq.heappush(self._heap, (at, self._n, agent))
            self._cond.notify()

    def take(self) -> SimAgent | None:
        with self._cond:
            while not self.stopping:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    return heapq.heappop(self._heap)[2]
                self._cond.wait(self._heap[0][0] - now if self._heap else None)
            return None

    def stop(self) -> None:
        with self._cond:
            self.stopping = True
            self._cond.notify_all()


class Worker:
    """One subprocess: its share of the agents, a thread pool, and a record of every call."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.batch_events = int(config["batch_events"])
        self.threads = int(config["threads"])
        self.records: list[tuple[int, float, float, int, str]] = []
        """(agent index, call start, call end, events stored, status code name)."""
        self.sched = Scheduler()
        self.listen_at: float | None = None
        self.mode = "upload"
        self.parked: list[SimAgent] = []
        self.reported = False
        self.first_ok: dict[int, float] = {}
        self.lock = threading.Lock()
        self.out_lock = threading.Lock()
        seed = int(config["seed"])
        self.agents = [
            SimAgent(
                index=i,
                hostname=host,
                state=Path(state),
                start_ns=int(config["start_ns"]),
                step_ns=int(config["step_ns"]) // (12 if i % HEAVY_EVERY == 0 else 1),
                rng=random.Random(seed * 1_000_003 + i),
            )
            for i, host, state in config["agents"]
        ]

    def emit(self, obj: dict[str, Any]) -> None:
        with self.out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    def prepare(self) -> None:
        from agent.shipper import CHANNEL_OPTIONS

        for agent in self.agents:
            agent.parts = static_parts(agent.hostname, agent.index, agent.rng)
            agent.open(CHANNEL_OPTIONS)
        self_check(self.agents[0])

    def connect(self) -> float:
        """One Heartbeat per agent: every TLS connection is up before the load starts."""
        from exfilwatch.v1 import collector_pb2

        def hello(agent: SimAgent) -> None:
            request = collector_pb2.HeartbeatRequest(agent_id=agent.agent_id, agent_version="0.1.0")
            agent.heartbeat(request, timeout=60)

        t0 = time.monotonic()
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(hello, self.agents))
        return time.monotonic() - t0

    def call(self, agent: SimAgent) -> None:
        """One call for `agent` (its pending batch, or a heartbeat in heartbeat mode);
        back in the queue at once after a success, after next_delay after a failure."""
        import grpc

        from agent.shipper import next_delay
        from exfilwatch.v1 import collector_pb2

        heartbeat = self.mode == "heartbeat"
        if not heartbeat:
            seq, request, digest, _ = agent.next_batch(self.batch_events)
        t0 = time.monotonic()
        try:
            if heartbeat:
                agent.heartbeat(
                    collector_pb2.HeartbeatRequest(
                        agent_id=agent.agent_id, sent_at_ns=time.time_ns()
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            else:
                ack = agent.upload(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            t1 = time.monotonic()
            code = e.code()
            self.records.append((agent.index, t0, t1, 0, code.name))
            if code.name in _REFUSED:
                agent.dead = f"{code.name}: {e.details()}"
                sys.stderr.write(f"fleet worker: agent {agent.index} refused: {agent.dead}\n")
                return
            delay = next_delay(agent.attempt, agent.rng, cap=MAX_BACKOFF_S)
            agent.attempt += 1
            self.sched.put(agent, t1 + delay)
            return
        t1 = time.monotonic()
        agent.attempt = 0
        if heartbeat:
            self.records.append((agent.index, t0, t1, 0, "OK"))
            if self.saw_ok(agent.index, t1):
                with self.lock:  # reconnected: idle until the load resumes
                    self.parked.append(agent)
            else:
                self.sched.put(agent, t1 + HEARTBEAT_EVERY_S)
            return
        if ack.batch_seq != seq or ack.batch_digest != digest:
            self.records.append((agent.index, t0, t1, 0, "ACK_MISMATCH"))
            agent.dead = "acknowledgement does not match the batch"
            return
        self.records.append((agent.index, t0, t1, ack.events_stored, "OK"))
        self.saw_ok(agent.index, t1)
        agent.batch_seq, agent.prev, agent.pending = seq, digest, None
        self.sched.put(agent, t1)

    def drive(self) -> None:
        while (agent := self.sched.take()) is not None:
            self.call(agent)

    def saw_ok(self, index: int, end: float) -> bool:
        """Note a successful call; once all agents succeeded after listen_at, say so.
        True when this call came after the new collector listened."""
        with self.lock:
            if self.listen_at is None or end <= self.listen_at:
                return False
            self.first_ok[index] = min(end, self.first_ok.get(index, end))
            if self.reported or len(self.first_ok) < sum(1 for a in self.agents if not a.dead):
                return True
            self.reported = True
            at = max(self.first_ok.values())
        self.emit({"event": "reconnected", "at": at})
        return True

    def listened(self, at: float) -> None:
        """The new collector listened at `at`: count the successes since (some are in)."""
        with self.lock:
            self.listen_at = at
            self.first_ok = {}
            self.reported = False
        for index, _, end, _, code in list(self.records):
            if code == "OK":
                self.saw_ok(index, end)

    def run(self, commands: IO[str]) -> None:
        t0 = time.monotonic()
        self.prepare()
        self.emit({"event": "prepared", "seconds": time.monotonic() - t0})
        connect_s = self.connect()
        self.emit({"event": "ready", "connect_s": connect_s})
        threads: list[threading.Thread] = []
        for line in commands:
            word, _, arg = line.strip().partition(" ")
            if word == "load":
                for agent in self.agents:
                    self.sched.put(agent, time.monotonic())
                threads = [
                    threading.Thread(target=self.drive, name=f"drive-{i}")
                    for i in range(self.threads)
                ]
                for t in threads:
                    t.start()
            elif word == "mode":  # a restart is coming (or the load resumes)
                with self.lock:
                    self.mode, self.listen_at = arg, None
                    parked, self.parked = self.parked, []
                for agent in parked:
                    self.sched.put(agent, time.monotonic())
            elif word == "listen":
                self.listened(float(arg))
            elif word == "stop":
                break
        self.sched.stop()
        for t in threads:
            t.join()
        for agent in self.agents:
            agent.channel.close()
        dead = {a.index: a.dead for a in self.agents if a.dead}
        pending = sum(a.pending[3] for a in self.agents if a.pending is not None)
        out = {"records": self.records, "dead": dead, "pending_events": pending}
        Path(self.config["out"]).write_text(json.dumps(out))
        self.emit({"event": "done"})


def worker_main() -> int:
    sys.stdout.write(json.dumps({"event": "hello"}) + "\n")
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line.startswith("start "):
        return 1
    config = json.loads(Path(line[len("start ") :].strip()).read_text())
    import grpc  # noqa: F401  (imported here, after the parent started this process)

    Worker(config).run(sys.stdin)
    return 0


# -- parent: collector, enrolment, measurement ----------------------------------------------


class WorkerProc:
    """A `fleet.py --worker` subprocess: JSON lines out, commands in."""

    def __init__(self, n: int, log_dir: Path) -> None:
        self.n = n
        self.popen = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(log_dir / f"worker{n}.log").open("ab"),
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log = log_dir / f"worker{n}.log"
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with contextlib.suppress(ValueError):
                self.messages.put(json.loads(line))
        self.messages.put({"event": "exit"})

    def send(self, command: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(command + "\n")
        self.popen.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty:
                break
            if message.get("event") == event:
                return message
            if message.get("event") == "exit":
                break
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"worker {self.n}: no {event!r} within {timeout} s; log:\n{tail}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


def serve(collector: Collector, listen: str, enroll: str, timeout: float = 180) -> float:
    """`collector serve` (like tests.procs.Collector.start, with a longer start-up allowance:
    the threshold windows are rebuilt from the store first); the monotonic time it listened."""
    (collector.data / "listen.json").unlink(missing_ok=True)
    collector.proc = Proc(
        [
            sys.executable,
            "-m",
            "collector",
            "serve",
            "--data",
            str(collector.data),
            "--listen",
            listen,
            "--enroll-listen",
            enroll,
            "--policy",
            str(collector.policy),
            *collector.serve_args,
        ],
        collector.log,
    )
    collector.proc.wait_line("listening", timeout=timeout)
    listened = time.monotonic()
    addresses = json.loads((collector.data / "listen.json").read_text())
    collector.agents, collector.enroll = addresses["agents"], addresses["enroll"]
    return listened


class Sampler:
    """Samples the collector's resident memory (it changes pid on restart)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.pid: int | None = None
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            pid = self.pid
            if pid is None:
                continue
            with contextlib.suppress(psutil.Error):
                rss = tree_rss(psutil.Process(pid))
                self.samples.append((time.monotonic(), rss))
                self.peak = max(self.peak, rss)

    def peak_between(self, t0: float, t1: float) -> int:
        return max((rss for t, rss in self.samples if t0 <= t <= t1), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def db_count(db: Path, table: str = "events") -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
    finally:
        con.close()


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of a process and its children (the collector's decode workers)."""
    total = int(process.memory_info().rss)
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total


def pids_cpu(pids: list[int], *, children: bool = False) -> float:
    """CPU seconds of the processes still there (and with `children`, of theirs)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += cpu_seconds(psutil.Process(pid), children=children)
    return total


def enrol_all(collector: Collector, tmp: Path, n: int, threads: int) -> list[tuple[int, str, str]]:
    """Enrol n identities through the real Enroll RPC; (index, hostname, state dir) each."""
    from agent.enroll import enroll

    token = collector.token(uses=n + 100)
    jobs = [(i, f"ws-{i:05d}", tmp / "agents" / f"a{i:05d}") for i in range(n)]

    def one(job: tuple[int, str, Path]) -> tuple[int, str, str]:
        i, host, state = job
        enroll(collector.enroll, token, state, host)
        return i, host, str(state)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, jobs))


@contextlib.contextmanager
def interrupts_as_exit() -> Iterator[None]:
    """SIGINT (even when inherited as ignored), SIGTERM and SIGHUP unwind like Ctrl-C, so
    the finally blocks stop every child."""

    def handler(signum: int, _: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    serve_args = []
    if args.decode_workers is not None:
        serve_args = ["--decode-workers", str(args.decode_workers)]
    collector = Collector(tmp / "collector", args.policy, tmp / "collector.log", serve_args)
    sampler = Sampler()
    workers: list[WorkerProc] = []
    try:
        # Workers first: no gRPC object exists in this process yet (FIELD-NOTES 2.6).
        load_before = os.getloadavg()[0]
        progress(f"starting {args.workers} worker processes")
        workers = [WorkerProc(n, tmp) for n in range(args.workers)]
        for w in workers:
            w.expect("hello", 60)

        progress(f"collector init + serve in {tmp}")
        collector.init()
        serve(collector, "127.0.0.1:0", "127.0.0.1:0")
        assert collector.proc is not None
        agent_addr = collector.agents
        sampler.pid = collector.proc.popen.pid
        sampler.start()
        rss_idle = tree_rss(psutil.Process(sampler.pid))

        progress(f"enrolling {args.agents} agents (Enroll RPC, {args.enrol_threads} threads)")
        t0 = time.monotonic()
        enrolled = enrol_all(collector, tmp, args.agents, args.enrol_threads)
        enrol_s = time.monotonic() - t0
        progress(f"enrolled {len(enrolled)} in {enrol_s:.1f} s")

        # Event time: each agent's copies advance from 20 days ago, a file every 60 s of event
        # time (5 s for heavy copiers), so the rules see ordinary and bursty hosts, all inside
        # the policy's longest window (30 d); an agent that gets ahead of now sends "now".
        step_ns = 60 * 10**9
        start_ns = time.time_ns() - 20 * DAY_NS
        rss_enrolled = tree_rss(psutil.Process(sampler.pid))
        for n, w in enumerate(workers):
            config = {
                "agents": enrolled[n :: args.workers],
                "batch_events": args.batch_events,
                "threads": args.threads,
                "seed": args.seed + n,
                "start_ns": start_ns,
                "step_ns": step_ns,
                "out": str(tmp / f"worker{n}.json"),
            }
            path = tmp / f"worker{n}.config.json"
            path.write_text(json.dumps(config))
            w.send(f"start {path}")
        prepared = [w.expect("prepared", 120)["seconds"] for w in workers]
        progress(f"workers built their agents ({max(prepared):.1f} s); connecting")
        ready = [w.expect("ready", 120)["connect_s"] for w in workers]
        conns = count_connections(sampler.pid, agent_addr)
        rss_connected = tree_rss(psutil.Process(sampler.pid))
        progress(f"{conns} agent connections up ({max(ready):.1f} s); load for {args.warmup} s")

        worker_pids = [w.popen.pid for w in workers]
        for w in workers:
            w.send("load")
        time.sleep(args.warmup)

        db = collector.data / "collector.db"
        m0 = time.monotonic()
        rows0 = db_count(db)
        cpu_c0, cpu_w0 = pids_cpu([sampler.pid], children=True), pids_cpu(worker_pids)
        cpu_p0 = pids_cpu([os.getpid()])
        sys0 = psutil.cpu_times()
        last_rows, last_t = rows0, m0
        while (left := m0 + args.seconds - time.monotonic()) > 0:
            time.sleep(min(5.0, left))
            rows, now = db_count(db), time.monotonic()
            progress(f"  {rows} events stored, {(rows - last_rows) / (now - last_t):,.0f}/s")
            last_rows, last_t = rows, now
        rows1 = db_count(db)
        m1 = time.monotonic()
        cpu_c1, cpu_w1 = pids_cpu([sampler.pid], children=True), pids_cpu(worker_pids)
        cpu_p1 = pids_cpu([os.getpid()])
        sys1 = psutil.cpu_times()
        conns_loaded = count_connections(sampler.pid, agent_addr)
        measured = m1 - m0
        progress(f"measured {rows1 - rows0} events in {measured:.1f} s")

        restarts = []
        for n, mode in enumerate(args.reconnect_with.split(",")):
            if n:
                progress(f"uploads for {args.warmup} s before the next restart")
                for w in workers:
                    w.send("mode upload")
                time.sleep(args.warmup)
            restarts.append(restart(collector, workers, sampler, mode))
        for w in workers:
            w.send("stop")
        for w in workers:
            w.expect("done", 60)
        end_at = time.monotonic()

        records: list[list[Any]] = []
        dead: dict[str, str] = {}
        pending = 0
        for n in range(args.workers):
            data = json.loads((tmp / f"worker{n}.json").read_text())
            records.extend(data["records"])
            dead.update(data["dead"])
            pending += data["pending_events"]
        collector.stop()
        sampler.stop()
        alerts = db_count(db, "alerts")
        evidence = db_count(db, "alert_events")
        total_rows = db_count(db)
    finally:
        for w in workers:
            w.kill()
        if collector.proc is not None:
            collector.stop()

    in_window = [r for r in records if m0 <= r[2] <= m1]
    ok = [r for r in in_window if r[4] == "OK"]
    latencies = sorted(r[2] - r[1] for r in ok)
    acked = sum(r[3] for r in ok)
    errors: dict[str, int] = {}
    for r in in_window:
        if r[4] != "OK":
            errors[r[4]] = errors.get(r[4], 0) + 1
    for r_ in restarts:
        r_.summarise(records)

    rate = (rows1 - rows0) / measured
    acked_total = sum(r[3] for r in records if r[4] == "OK")
    cpu_per_event = (cpu_c1 - cpu_c0) / max(rows1 - rows0, 1)
    busy = sys1.user + sys1.system + sys1.irq + sys1.softirq + sys1.steal
    busy -= sys0.user + sys0.system + sys0.irq + sys0.softirq + sys0.steal
    ours = (cpu_c1 - cpu_c0) + (cpu_w1 - cpu_w0) + (cpu_p1 - cpu_p0)
    p99 = percentile(latencies, 99)
    return {
        "bench": "fleet",
        "agents": args.agents,
        "workers": args.workers,
        "decode_workers": args.decode_workers,
        "threads_per_worker": args.threads,
        "max_in_flight": args.workers * args.threads,
        "batch_events": args.batch_events,
        "policy": str(args.policy),
        "cpus": os.cpu_count(),
        "enrol": {"seconds": round(enrol_s, 2), "per_s": round(args.agents / enrol_s, 1)},
        "connect_seconds": round(max(ready), 2),
        "agent_connections": {"loaded": conns_loaded, "before_load": conns},
        "measured_seconds": round(measured, 2),
        "events_stored": rows1 - rows0,
        "events_per_s": round(rate),
        "acked_events_per_s": round(acked / measured),
        "batches_per_s": round(len(ok) / measured, 1),
        "errors_in_window": errors,
        "ack_latency_ms": {
            "calls": len(latencies),
            "p50": ms(percentile(latencies, 50)),
            "p90": ms(percentile(latencies, 90)),
            "p99": ms(p99),
            "max": ms(latencies[-1]),
        },
        "collector": {
            "rss_mib_idle": round(rss_idle / 2**20, 1),
            "rss_mib_after_enrol": round(rss_enrolled / 2**20, 1),
            "rss_mib_connected": round(rss_connected / 2**20, 1),
            "rss_mib_peak_measured": round(sampler.peak_between(m0, m1) / 2**20, 1),
            "rss_mib_peak": round(sampler.peak / 2**20, 1),
            "cpu_cores_measured": round((cpu_c1 - cpu_c0) / measured, 2),
            "cpu_us_per_event": round(cpu_per_event * 1e6, 1),
            "events_per_s_per_busy_core": round(1 / cpu_per_event) if cpu_per_event else None,
        },
        "workers_cpu_cores_measured": round((cpu_w1 - cpu_w0) / measured, 2),
        "machine_cpu_measured": {
            "busy_cores": round(busy / measured, 2),
            "other_processes_cores": round(max(0.0, busy - ours) / measured, 2),
            "iowait_cores": round((sys1.iowait - sys0.iowait) / measured, 2),
            "loadavg_1m_before": round(load_before, 2),
        },
        "restarts": [r_.summary for r_ in restarts],
        "refused_agents": dead,
        "total_events_in_db": total_rows,
        "exactly_once": {
            "acked_events": acked_total,
            "unacked_pending_events": pending,
            "ok": 0 <= total_rows - acked_total <= pending,
        },
        "alerts": alerts,
        "evidence_links": evidence,
        "wall_seconds": round(end_at - _START, 1),
        "target": {
            "events_per_s": TARGET_EVENTS_PER_S,
            "p99_ack_ms": TARGET_P99_MS,
            "reconnect_s": TARGET_RECONNECT_S,
        },
        "met": {
            "events_per_s": rate >= TARGET_EVENTS_PER_S,
            "p99_ack_ms": p99 * 1000 < TARGET_P99_MS,
            **{
                f"reconnect_s_{r_.mode}": r_.summary["reconnect_seconds"] < TARGET_RECONNECT_S
                and r_.summary["agents_reconnected"] == args.agents - len(dead)
                for r_ in restarts
            },
        },
    }


@dataclass
class Restart:
    """One collector restart while the agents keep trying, and what it cost."""

    mode: str
    kill_at: float = 0.0
    stopped_at: float = 0.0
    listen_at: float = 0.0
    reconnected_at: float = 0.0
    events_in_db: int = 0
    connections_after: int = 0
    summary: dict[str, Any] = field(default_factory=dict)

    def summarise(self, records: list[list[Any]]) -> None:
        first_ok: dict[int, float] = {}
        failed: dict[str, int] = {}
        failed_after_listen = 0
        for index, start, end, _, code in sorted(records, key=lambda r: r[2]):
            if code == "OK" and end > self.listen_at and index not in first_ok:
                first_ok[index] = end - self.listen_at
            if code != "OK" and self.kill_at <= end <= self.reconnected_at:
                failed[code] = failed.get(code, 0) + 1
                failed_after_listen += start > self.listen_at
        waits = sorted(first_ok.values())
        self.summary = {
            "agents_retry_with": self.mode,
            "stop_seconds": round(self.stopped_at - self.kill_at, 2),
            "start_seconds": round(self.listen_at - self.stopped_at, 2),
            "events_in_db_at_restart": self.events_in_db,
            "down_seconds": round(self.listen_at - self.kill_at, 2),
            "reconnect_seconds": round(self.reconnected_at - self.listen_at, 2),
            "reconnect_p50_s": round(percentile(waits, 50), 2) if waits else None,
            "agents_reconnected": len(first_ok),
            "agent_connections_after": self.connections_after,
            "failed_calls": failed,
            "failed_calls_started_after_listening": failed_after_listen,
        }


def restart(
    collector: Collector, workers: list[WorkerProc], sampler: Sampler, mode: str
) -> Restart:
    """SIGTERM the collector, serve again on the same ports; wait until every agent's call
    (its next batch, or a heartbeat) has succeeded against the new one."""
    r = Restart(mode)
    progress(f"restarting the collector (SIGTERM); agents keep trying ({mode})")
    agents, enroll = collector.agents, collector.enroll
    for w in workers:
        w.send(f"mode {mode}")
    r.events_in_db = db_count(collector.data / "collector.db")
    r.kill_at = time.monotonic()
    collector.stop()
    r.stopped_at = time.monotonic()
    sampler.pid = None
    r.listen_at = serve(collector, agents, enroll)
    assert collector.proc is not None
    sampler.pid = collector.proc.popen.pid
    progress(f"listening again after {r.listen_at - r.kill_at:.1f} s down; waiting for agents")
    for w in workers:
        w.send(f"listen {r.listen_at!r}")
    r.reconnected_at = max(w.expect("reconnected", 120)["at"] for w in workers)
    progress(f"all agents reconnected {r.reconnected_at - r.listen_at:.1f} s after listening")
    r.connections_after = count_connections(sampler.pid, agents)
    return r


def count_connections(pid: int | None, address: str) -> int:
    """Established TCP connections of the collector on its agent port."""
    if pid is None:
        return 0
    port = int(address.rpartition(":")[2])
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return 0
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


_START = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4, help="load-generating processes")
    parser.add_argument(
        "--threads", type=int, default=8, help="calls in flight per worker (default 8: 32 in all)"
    )
    parser.add_argument("--seconds", type=float, default=45, help="measured interval")
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--batch-events", type=int, default=100)
    parser.add_argument(
        "--reconnect-with",
        default="heartbeat,upload",
        help="one restart per item: what the agents send meanwhile (heartbeat: only that,"
        " then idle; upload: their next batch, as a busy agent does)",
    )
    parser.add_argument("--enrol-threads", type=int, default=8)
    parser.add_argument("--policy", type=Path, default=POLICY)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--decode-workers", type=int, help="the collector's `serve --decode-workers` (default: its)"
    )
    parser.add_argument("--keep", type=Path, help="keep the data in this directory")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main()
    try:
        with interrupts_as_exit(), tempfile.TemporaryDirectory(prefix="exfilwatch-fleet-") as td:
            tmp = args.keep or Path(td)
            tmp.mkdir(parents=True, exist_ok=True)
            result = run(args, tmp)
    except KeyboardInterrupt as e:
        progress(f"interrupted ({str(e) or 'Ctrl-C'}); collector and workers stopped")
        return 130
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
