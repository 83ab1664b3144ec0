"""Restart: how long `collector serve` takes to listen, and to restore its rule windows, on a
large store.

Builds (once; `--data` reuses it) a collector data directory holding `--events` (default
1,000,000) events from `--agents` (default 500) enrolled identities, with bench/fleet.py's
event mix (each workstation's user copies confidential or secret files to its USB stick;
one in ten copies by one of 20 admin accounts; event times from 20 days ago, 60 s apart, 5
s for one agent in 50). The batches are real: signed with each agent's Ed25519 key,
hash-chained, and ingested in process through `collector.ingest.Ingestor.upload` (verify,
store with the collector's pragmas, threshold rules, alerts), so the store holds the
alerts a live collector would have opened.

Then it starts `python -m collector serve` on it `--runs` times (SIGTERM between runs) and
reports `listening_s` (process start to its "listening" line) and `restored_s` (process
start to its "rule windows restored" log line), each run.

    .venv/bin/python bench/restart.py [--events 1000000] [--agents 500] [--data DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import POLICY, progress
from bench.fleet import HEAVY_EVERY, SimAgent, static_parts

DAY_NS = 86_400 * 10**9
BATCH_EVENTS = 500


def build(data: Path, n_events: int, n_agents: int) -> dict[str, int]:
    """Create and fill the data directory with real signed batches, ingested in process."""
    from agent.signer import Signer
    from collector import pki
    from collector.cli import DB_FILE
    from collector.ingest import Ingestor
    from collector.policy import load_policy
    from collector.store import SqliteStore

    pki.init_pki(data)
    store = SqliteStore.open(data / DB_FILE, synchronous="FULL")
    try:
        policy = load_policy(POLICY)
        ingest = Ingestor(store, policy)
        now = time.time_ns()
        agents = []
        for i in range(n_agents):
            rng = random.Random(i)
            signer = Signer.generate()
            agent_id = pki.agent_id_for(signer.public_key_raw())
            store.add_agent(
                agent_id=agent_id,
                public_key=signer.public_key_raw(),
                key_id=signer.key_id(),
                hostname=f"ws-{i:05d}",
                agent_version="0.1.0",
                enrolled_at_ns=now,
            )
            step = 5 if i % HEAVY_EVERY == 0 else 60
            sim = SimAgent(i, f"ws-{i:05d}", data, now - 20 * DAY_NS, step * 10**9, rng)
            sim.parts = static_parts(sim.hostname, i, rng)
            sim.agent_id, sim.signer = agent_id, signer
            agents.append(sim)
        per_agent = n_events // n_agents
        sent = 0
        started = time.monotonic()
        while sent < per_agent * n_agents:
            for sim in agents:
                n = min(BATCH_EVENTS, per_agent - sim.event_seq)
                if n <= 0:
                    continue
                seq, request, digest, _ = sim.next_batch(n)
                ack = ingest.upload(request, sim.agent_id, time.time_ns())
                assert ack.batch_seq == seq and ack.batch_digest == digest
                sim.batch_seq, sim.prev, sim.pending = seq, digest, None
                sent += n
            progress(f"ingested {sent} events ({sent / (time.monotonic() - started):.0f}/s)")
        alerts = store.list_alerts(limit=100_000)
        return {"events": store.count_events(), "alerts": len(alerts)}
    finally:
        store.close()


def time_serve(data: Path, log: Path) -> dict[str, float]:
    """Start `serve`; seconds from spawn to its listening line and to its restored line."""
    args = [sys.executable, "-m", "collector", "serve", "--data", str(data)]
    args += ["--listen", "127.0.0.1:0", "--enroll-listen", "127.0.0.1:0", "--policy", str(POLICY)]
    if _has_console_flag():
        args.append("--no-console")  # measure the collector, not the web console
    lines: queue.Queue[tuple[float, str]] = queue.Queue()
    env = dict(os.environ, PYTHONUNBUFFERED="1", EXFILWATCH_LOGLEVEL="INFO")
    start = time.monotonic()
    with log.open("ab") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

        def pump(stream: object, tee: bool) -> None:
            for raw in stream:  # type: ignore[attr-defined]
                lines.put((time.monotonic(), raw.decode(errors="replace")))
                if tee:
                    err.write(raw)

        readers = [
            threading.Thread(target=pump, args=(proc.stdout, False)),
            threading.Thread(target=pump, args=(proc.stderr, True)),
        ]
        for t in readers:
            t.start()
        found: dict[str, float] = {}
        try:
            while len(found) < 2:
                try:
                    at, line = lines.get(timeout=300 if "listening_s" not in found else 60)
                except queue.Empty:
                    if "listening_s" not in found:
                        raise
                    # A collector that restores before it listens does not report it.
                    found["restored_s"] = found["listening_s"]
                    break
                if "listening" in line and "listening_s" not in found:
                    found["listening_s"] = at - start
                if "rule windows restored" in line:
                    found["restored_s"] = at - start
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            for t in readers:
                t.join()
    return found


def _has_console_flag() -> bool:
    """Whether this collector's `serve` runs a web console that --no-console turns off."""
    help_text = subprocess.run(
        [sys.executable, "-m", "collector", "serve", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return "--no-console" in help_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--data", type=Path, help="reuse (or create) this data directory")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="exfilwatch-restart-") as tmp:
        data = args.data or Path(tmp) / "collector"
        built: dict[str, int] = {}
        if not (data / "collector.db").exists():
            progress(f"building {data} with {args.events} events")
            built = build(data, args.events, args.agents)
        size = (data / "collector.db").stat().st_size
        runs = []
        for i in range(args.runs):
            runs.append(time_serve(data, Path(tmp) / "serve.log"))
            progress(f"run {i + 1}: {runs[-1]}")
        result = {
            "data": str(data) if args.data else "(temporary)",
            "db_mib": round(size / 2**20),
            **built,
            "runs": runs,
            "load_avg_1m": os.getloadavg()[0],
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
