"""The single writer alone: `Ingestor.store_group` on fleet-like batches, in this process.

`serve`'s throughput is bounded by the ingest process's writer thread (the rules and the
SQLite transaction of each group commit). This bench times just that, with no gRPC, no
pipes and no other process competing for the two cores, so a change to the writer can be
measured in a few seconds and without the noise of bench/fleet.py.

Builds --agents enrolled agents, each with its own workstation and user (bench/ingest.py's
`fleet` and `copy_event`), and signed batches of --batch events, agent after agent; then
verifies them and builds their rows up front (the decode workers' half, untimed) and
writes them in groups of --group batches (one transaction each, synchronous=FULL, the
background checkpointer running, as in serve) through the Ingestor and configs/policy.yaml.

--times history (default): each agent's events are a minute apart from 20 days ago, as
bench/fleet.py sends them, so 500 agents' events interleave in time and every batch
lands on pages all over the time-ordered indexes (events_time, the event id). --times
live: events of the last moments, as a live fleet sends them (inserts at the indexes'
right edge).

Prints one JSON object: events/s of the writer, wall and CPU microseconds per event, and
bytes the writer thread wrote per event (its WAL frames, from /proc/thread-self/io).

    .venv/bin/python bench/writer.py [--events 400000] [--agents 500] [--group 4]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import codec
from bench.common import POLICY, progress
from bench.ingest import DAY_NS, Host, copy_event, fleet
from collector.decoding import verify_and_prepare
from collector.ingest import Ingestor
from collector.policy import policy_from_document
from collector.procsetup import serving_gc
from collector.records import StoreResult
from collector.store import PreparedBatch, SqliteStore
from collector.verify import ChainHead
from tests.collector.batches import BatchChain, enroll, new_agent

STEP_NS = 60 * 10**9
"""--times history: event spacing per agent, as bench/fleet.py's."""


def written_bytes() -> int:
    """Bytes this thread passed to write calls so far (Linux)."""
    with open("/proc/thread-self/io") as f:
        return int(next(line for line in f if line.startswith("wchar")).split()[1])


def build(
    chains: list[tuple[BatchChain, Host]],
    n_events: int,
    batch: int,
    times: str,
    rng: random.Random,
) -> list[PreparedBatch]:
    """Signed batches, agent after agent, verified and with their rows built."""
    prepared = []
    now = time.time_ns()
    start = now - 20 * DAY_NS
    for i in range(n_events // batch):
        chain, host = chains[i % len(chains)]
        events = []
        for k in range(batch):
            chain.event_seq += 1
            if times == "history":
                t = min(start + chain.event_seq * STEP_NS, now - 10**9)
            else:
                t = now - 10**9 + i * 1_000 + k
            events.append(codec.event_to_bytes(copy_event(host, chain.event_seq, t, rng)))
        agent = chain.agent
        head = ChainHead(chain.batch_seq, chain.prev_digest) if chain.batch_seq else None
        body = codec.encode_batch(
            agent.agent_id, chain.batch_seq + 1, chain.prev_digest, now, events
        )
        signed = chain.seal(body)
        prepared.append(verify_and_prepare(signed.parts, agent.agent_id, agent.key(), head))
    return prepared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--batch", type=int, default=100, help="events per batch")
    parser.add_argument("--group", type=int, default=4, help="batches per group commit")
    parser.add_argument("--times", choices=("history", "live"), default="history")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    serving_gc()

    with tempfile.TemporaryDirectory(prefix="exfilwatch-bench-writer-") as tmp:
        store = SqliteStore(Path(tmp) / "collector.db", synchronous="FULL")
        try:
            hosts = fleet(args.agents, 0, rng)
            chains = [(BatchChain(new_agent()), host) for host in hosts]
            for chain, _ in chains:
                enroll(store, chain.agent)
            progress(f"building {args.events} events in batches of {args.batch}")
            batches = build(chains, args.events, args.batch, args.times, rng)
            ingest = Ingestor(store, policy_from_document(POLICY.read_bytes(), str(POLICY)))
            ingest.restore(time.time_ns())
            progress(f"writing {len(batches)} batches in groups of {args.group}")
            wall = cpu = 0.0
            written = stored = 0
            for first in range(0, len(batches), args.group):
                now_ns = time.time_ns()
                group = [ingest.pending(p, now_ns) for p in batches[first : first + args.group]]
                w0, c0, t0 = written_bytes(), time.thread_time(), time.perf_counter()
                outcomes = ingest.store_group(group)
                wall += time.perf_counter() - t0
                cpu += time.thread_time() - c0
                written += written_bytes() - w0
                for outcome in outcomes:
                    if not isinstance(outcome, StoreResult):
                        raise RuntimeError(f"refused: {outcome}")
                    stored += outcome.events_stored
        finally:
            store.close()
        con = sqlite3.connect(Path(tmp) / "collector.db")
        alerts, links = con.execute(
            "SELECT (SELECT count(*) FROM alerts), (SELECT count(*) FROM alert_events)"
        ).fetchone()
        con.close()
    result = {
        "bench": "writer",
        "events": stored,
        "agents": args.agents,
        "batch": args.batch,
        "group": args.group,
        "times": args.times,
        "policy": str(POLICY),
        "events_per_s": round(stored / wall),
        "wall_us_per_event": round(wall / stored * 1e6, 1),
        "cpu_us_per_event": round(cpu / stored * 1e6, 1),
        "written_bytes_per_event": round(written / stored),
        "alerts": alerts,
        "evidence_links": links,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
