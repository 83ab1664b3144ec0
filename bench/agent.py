"""Agent budgets: events/s without loss, idle CPU, memory, and index hashing throughput.

One run, one JSON object on stdout (progress on stderr), the four budgets of issue 3:

(a) events: a writer creates --burst-files small files (open, write, close) in a watched
    destination at a paced rate; a child process runs the agent's real Watcher + Pipeline
    (sensitive root of 1,000 labelled files, destination; emitted events are counted),
    another a bare watchdog Observer with a counting handler and the same event filter.
    Rates go up until a run loses events (kernel overflow, queue drops, or fewer events
    handled than written); each side's figure is its best lossless run.
(b) idle CPU and (c) memory: a real `python -m agent run` (enrolled with a real collector)
    indexes --files labelled files, then sits idle for --idle-seconds; its CPU time over
    that window and its resident memory are read with psutil (the bench's own memory does
    not count).
(d) hashing: the initial index scan (Scanner + FileHasher, rate cap off) over --hash-mib
    of document-sized files, beside plain `hashlib.file_digest(f, "sha256")` over the same
    files, page cache warm, best of 3 each; the same over the --files small files.

    .venv/bin/python bench/agent.py [--files 100000] [--idle-seconds 60]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent.attribution import Attributor
from agent.clock import SystemClock
from agent.config import AgentConfig, DestinationConfig
from agent.copy_detector import CopyDetector
from agent.events import DestinationClass, Event
from agent.index import FileHasher, Scanner, SensitiveIndex
from agent.labels import Labeller
from agent.pipeline import Pipeline
from agent.watcher import EVENT_FILTER, ObservationQueue, Role, Watcher
from bench.common import enroll, progress, start_collector
from tests.procs import Proc

TARGET_EVENTS_PER_S = 10_000
TARGET_EVENTS_RATIO = 0.25
TARGET_IDLE_CPU_PERCENT = 0.5
TARGET_RSS_MIB = 80.0
TARGET_HASH_RATIO = 0.7
LABEL_XATTR = "user.exfilwatch.label"
EVENTS_PER_FILE = 2
"""Created + closed-after-write: what the agent's destination filter lets through per file."""
STALL_S = 3.0
"""A child stops waiting for more events after this long without one."""
MiB = 1024**2


# -- test data -------------------------------------------------------------------------


class Content:
    """Distinct file contents cut from one random pool (fast to make in bulk)."""

    def __init__(self, rng: random.Random) -> None:
        self._pool = os.urandom(16 * MiB)
        self._rng = rng

    def make(self, size: int, i: int) -> bytes:
        tag = b"%012d" % i  # makes every file distinct
        start = self._rng.randrange(0, len(self._pool) - size)
        return tag + self._pool[start : start + max(0, size - len(tag))]


def make_tree(root: Path, sizes: list[int], content: Content, per_dir: int = 1000) -> int:
    """Labelled files (xattr confidential) of `sizes` under `root`; returns total bytes."""
    total = 0
    for i, size in enumerate(sizes):
        folder = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"doc-{i:06d}.docx"
        data = content.make(size, i)
        path.write_bytes(data)
        os.setxattr(path, LABEL_XATTR, b"confidential")
        total += len(data)
    return total


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


# -- (d) hashing -----------------------------------------------------------------------


def hashing(root: Path, rounds: int = 3) -> dict[str, Any]:
    """Index scan (walk, label, hash) beside plain hashlib over the same files, warm cache."""
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in paths)
    config = AgentConfig(state_dir=root, sensitive_roots=(root,), destinations=(), host="b")

    def plain() -> float:
        started = time.perf_counter()
        for path in paths:
            with path.open("rb") as f:
                hashlib.file_digest(f, "sha256")
        return time.perf_counter() - started

    def scan() -> float:
        index = SensitiveIndex(config.labels.levels)
        scanner = Scanner([os.fsencode(root)], Labeller(config), index, FileHasher(2**40))
        started = time.perf_counter()
        stats = scanner.scan()
        seconds = time.perf_counter() - started
        if stats.hashed != len(paths):
            raise SystemExit(f"scan hashed {stats.hashed} of {len(paths)} files")
        return seconds

    plain()  # warm the page cache
    plain_s, scan_s = [], []
    for _ in range(rounds):
        plain_s.append(plain())
        scan_s.append(scan())
    best_plain, best_scan = min(plain_s), min(scan_s)
    return {
        "files": len(paths),
        "mib": round(total / MiB, 1),
        "index_scan_mb_per_s": round(total / best_scan / 1e6, 1),
        "hashlib_mb_per_s": round(total / best_plain / 1e6, 1),
        "index_scan_files_per_s": round(len(paths) / best_scan),
        "hashlib_files_per_s": round(len(paths) / best_plain),
        "ratio": round(best_plain / best_scan, 3),
        "runs_s": {"index_scan": [round(s, 3) for s in scan_s],
                   "hashlib": [round(s, 3) for s in plain_s]},
    }  # fmt: skip


# -- (b) idle CPU and (c) memory: the real agent ---------------------------------------


@contextlib.contextmanager
def quiet_filesystem(where: Path, *, tmpfs: bool = True) -> Iterator[str]:
    """A private tmpfs at `where` when root and `tmpfs`, so that the idle agent watches a
    filesystem nothing else writes to; else just the folder (on the disk the temporary
    folder is on, shared with every other process). Yields what it is.

    On the shared disk the figure includes what the agent's fanotify marks (tier-1
    attribution, agent.fanotify) cost while other processes work elsewhere on it.
    """
    where.mkdir()
    mounted = False
    if tmpfs and os.geteuid() == 0:
        rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g,mode=0755", "tmpfs", where],
                            capture_output=True, check=False).returncode  # fmt: skip
        mounted = rc == 0
    try:
        yield "tmpfs (private)" if mounted else "shared"
    finally:
        if mounted:
            subprocess.run(["umount", where], check=True)


def idle_agent(tmp: Path, sensitive: Path, usb: Path, files: int, idle_s: float) -> dict[str, Any]:
    usb.mkdir()
    progress("starting a collector and enrolling the agent")
    collector = start_collector(tmp)
    try:
        state = tmp / "agent-state"
        enroll(collector, state, "bench-agent")
        config = tmp / "agent.yaml"
        config.write_text(
            f"state_dir: {state}\nhost: bench-agent\nsensitive_roots: [{sensitive}]\n"
            f"destinations:\n  - path: {usb}\n    class: removable\n"
        )
        log = tmp / "agent.log"
        started = time.monotonic()
        agent = Proc([sys.executable, "-m", "agent", "run", "--config", str(config)], log)
        try:
            agent.wait_line("running as", timeout=1800)
            startup_s = time.monotonic() - started
            match = re.search(r"running: (\d+) labelled files indexed", log.read_text())
            indexed = int(match.group(1)) if match else -1
            fanotify = "attribution by fanotify" in log.read_text()
            if indexed != files:
                raise SystemExit(f"agent indexed {indexed} files, expected {files}")
            proc = psutil.Process(agent.popen.pid)
            progress(f"agent indexed {indexed} files in {startup_s:.1f} s; idle {idle_s:.0f} s")
            before = proc.cpu_times()
            machine_before = psutil.cpu_times()
            t0 = time.monotonic()
            rss_samples = []
            tick = threading.Event()
            while (left := idle_s - (time.monotonic() - t0)) > 0:
                tick.wait(min(left, 1.0))  # sampling interval, not synchronisation
                rss_samples.append(proc.memory_info().rss)
            after = proc.cpu_times()
            elapsed = time.monotonic() - t0
            machine_after = psutil.cpu_times()
            cpu = (after.user - before.user) + (after.system - before.system)
            busy = sum(machine_after) - sum(machine_before)
            busy -= (machine_after.idle - machine_before.idle) + (
                machine_after.iowait - machine_before.iowait
            )
            status = Path(f"/proc/{proc.pid}/status").read_text()
            hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
            threads = proc.num_threads()
        finally:
            agent.stop()
    finally:
        collector.stop()
    return {
        "indexed_files": indexed,
        "startup_s": round(startup_s, 1),
        "idle_s": round(elapsed, 1),
        "cpu_s": round(cpu, 3),
        "cpu_percent_of_one_core": round(100 * cpu / elapsed, 3),
        "other_processes_cores": round((busy - cpu) / elapsed, 2),
        "rss_mib": round(rss_samples[-1] / MiB, 1),
        "rss_mib_max_while_idle": round(max(rss_samples) / MiB, 1),
        "peak_rss_mib": round(hwm / MiB, 1),
        "threads": threads,
        "attribution": "fanotify" if fanotify else "best effort",
    }


# -- (a) events/s: children --------------------------------------------------------------


class Counter_(FileSystemEventHandler):
    """The bare observer's handler: counts, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def dispatch(self, event: FileSystemEvent) -> None:
        self.count += 1


def child_events(mode: str, sensitive: Path, dest: Path, expected: int) -> int:
    """Watch, say "ready", count until `expected` events were handled or STALL_S passed."""
    logging.basicConfig(level=logging.ERROR)  # losses are in the result, not on stderr
    counted: Callable[[], int]
    extra: Callable[[], dict[str, int]]
    stop: Callable[[], None]
    if mode == "bare":
        observer = Observer()
        handler = Counter_()
        for root in (sensitive, dest):
            observer.schedule(handler, os.fsencode(root), recursive=True, event_filter=EVENT_FILTER)  # type: ignore[arg-type]
        observer.start()

        def counted() -> int:
            return handler.count

        def extra() -> dict[str, int]:
            return {}

        def stop() -> None:
            observer.stop()
            observer.join()
    else:
        config = AgentConfig(
            state_dir=dest.parent / "state",
            sensitive_roots=(sensitive,),
            destinations=(DestinationConfig(dest, DestinationClass.REMOVABLE),),
            host="bench",
        )
        index = SensitiveIndex(config.labels.levels)
        observations: ObservationQueue = queue.Queue(maxsize=config.queue_size)
        watcher = Watcher([(sensitive, Role.SENSITIVE), (dest, Role.DESTINATION)], observations)
        emitted: list[Event] = []
        hasher = FileHasher(config.hashing.max_file_bytes)
        pipeline = Pipeline(
            config,
            index,
            CopyDetector(index),
            Attributor(),
            hasher,
            emitted.append,
            SystemClock(),
            observations=observations,
            drops=watcher.take_dropped,
        )
        pipeline.start()
        watcher.start()
        pipeline.rescan()

        def counted() -> int:
            return pipeline.stats().observations

        def extra() -> dict[str, int]:
            stats = pipeline.stats()
            return {
                "queue_drops": stats.queue_drops + watcher.dropped,
                "overflows": stats.overflows,
                "indexed": len(index),
                "events_emitted": len(emitted),
            }

        def stop() -> None:
            watcher.stop()
            pipeline.stop()

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    cpu_before = sum(os.times()[:2])
    base = counted()  # the startup scan's own events, if any
    last, last_change = base, time.monotonic()
    done_at = None
    tick = threading.Event()
    while True:
        now = time.monotonic()
        n = counted() - base
        if n != last:
            last, last_change = n, now
        if n >= expected:
            done_at = now
            break
        if now - last_change > STALL_S and n > 0:
            break
        if now - last_change > 60:
            break
        tick.wait(0.005)  # poll interval, not synchronisation
    cpu = sum(os.times()[:2]) - cpu_before
    result = {"count": last, "done_at": done_at, "last_change": last_change, "cpu_s": cpu,
              **extra()}  # fmt: skip
    stop()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


def write_burst(dest: Path, n: int, events_per_s: float, content: Content,
                rng: random.Random) -> tuple[float, float]:  # fmt: skip
    """Create n files at `events_per_s` (0: as fast as possible); (start, end) monotonic."""
    blobs = [content.make(rng.randint(512, 4096), i) for i in range(n)]
    files_per_s = events_per_s / EVENTS_PER_FILE
    pace = threading.Event()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    start = time.monotonic()
    for i, blob in enumerate(blobs):
        if files_per_s and i % 20 == 0:
            ahead = start + i / files_per_s - time.monotonic()
            if ahead > 0:
                pace.wait(ahead)  # pacing the writer, not synchronisation
        fd = os.open(dest / f"f{i:06d}.bin", flags, 0o644)
        os.write(fd, blob)
        os.close(fd)
    return start, time.monotonic()


def events_trial(mode: str, tmp: Path, sensitive: Path, n: int, rate: float, trial: int,
                 content: Content, rng: random.Random) -> dict[str, Any]:  # fmt: skip
    dest = tmp / f"events-{mode}-{trial}" / "usb"
    dest.mkdir(parents=True)
    expected = n * EVENTS_PER_FILE
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", mode, "--sensitive", str(sensitive),
         "--dest", str(dest), "--expected", str(expected)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        raise SystemExit(f"{mode} child did not start")
    start, end = write_burst(dest, n, rate, content, rng)
    line = child.stdout.readline()
    child.wait(timeout=120)
    got = json.loads(line)
    finished = got["done_at"] or got["last_change"]
    lost = expected - got["count"]
    lossless = lost == 0 and not got.get("queue_drops") and not got.get("overflows")
    return {
        "mode": mode,
        "target_events_per_s": rate or "unpaced",
        "written_events_per_s": round(expected / (end - start)),
        "handled_events_per_s": round(got["count"] / (finished - start)),
        "events": expected,
        "lost": lost,
        "lossless": lossless,
        # CPU per event handled: what the machine's other load does not change much.
        "cpu_us_per_event": round(got["cpu_s"] * 1e6 / max(got["count"], 1), 1),
        **{k: v for k, v in got.items() if k in ("queue_drops", "overflows", "events_emitted")},
    }


def events(tmp: Path, n: int, rates: list[float], tries: int, content: Content,
           rng: random.Random) -> dict[str, Any]:  # fmt: skip
    sensitive = tmp / "events-sensitive"
    make_tree(sensitive, [rng.randint(1000, 8000) for _ in range(1000)], content)
    trials: list[dict[str, Any]] = []
    best: dict[str, int] = {}

    def run(mode: str, rate: float) -> bool:
        trial = events_trial(mode, tmp, sensitive, n, rate, len(trials), content, rng)
        trials.append(trial)
        progress(f"events {mode} at {trial['target_events_per_s']}: {trial}")
        if trial["lossless"]:
            best[mode] = max(best.get(mode, 0), trial["handled_events_per_s"])
        return bool(trial["lossless"])

    # The bare observer's capacity: unpaced runs before and after the agent's, the best
    # counts (on a shared machine the writer itself can be starved in any one run).
    for _ in range(tries):
        run("bare", 0)
    for rate in rates:
        # A second try before a loss counts: one run can be starved too.
        if not any(run("agent", rate) for _ in range(tries)):
            break
    for _ in range(tries):
        run("bare", 0)
    agent_rate, bare_rate = best.get("agent", 0), best.get("bare", 0)
    return {
        "files_per_run": n,
        "agent_events_per_s": agent_rate,
        "bare_events_per_s": bare_rate,
        "ratio": round(agent_rate / bare_rate, 3) if bare_rate else None,
        "trials": trials,
    }


# -- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000, help="labelled files indexed")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--burst-files", type=int, default=20_000, help="files per events run")
    parser.add_argument("--rates", default="10000,15000,20000,30000,0",
                        help="events/s tried in turn, 0 = unpaced")  # fmt: skip
    parser.add_argument("--tries", type=int, default=2, help="runs per rate before a loss counts")
    parser.add_argument("--hash-mib", type=int, default=512, help="document corpus for (d)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--idle-on", choices=("tmpfs", "disk"), default="tmpfs",
                        help="(b)(c): a private tmpfs (as root), or the shared disk of "
                        "the temporary folder")  # fmt: skip
    parser.add_argument("--parts", default="hashing,idle,events",
                        help="comma-separated subset of hashing,idle,events")  # fmt: skip
    parser.add_argument("--child", choices=("agent", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--sensitive", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--expected", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_events(args.child, args.sensitive, args.dest, args.expected)

    rng = random.Random(args.seed)
    content = Content(rng)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="exfilwatch-bench-agent-") as tmpdir:
        tmp = Path(tmpdir)
        parts = set(args.parts.split(","))
        result: dict[str, Any] = {"bench": "agent"}
        met: dict[str, bool] = {}
        if "hashing" in parts:
            docs = tmp / "docs"
            sizes, total = [], 0
            while total < args.hash_mib * MiB:
                sizes.append(log_uniform(rng, 16 * 1024, 8 * MiB))
                total += sizes[-1]
            progress(f"(d) {len(sizes)} documents, {total / MiB:.0f} MiB")
            make_tree(docs, sizes, content)
            hash_docs = hashing(docs)
            progress(f"(d) documents: {hash_docs}")
            result["hashing"] = {"documents": hash_docs}
            met["hashing"] = hash_docs["ratio"] >= TARGET_HASH_RATIO

        small_sizes = [rng.randint(1024, 8192) for _ in range(args.files)]
        if "hashing" in parts:
            small = tmp / "indexed"
            progress(f"(d) creating {args.files} labelled files (1-8 KiB)")
            make_tree(small, small_sizes, content)
            hash_small = hashing(small)
            progress(f"(d) small files: {hash_small}")
            result["hashing"]["indexed_small_files"] = hash_small

        if "idle" in parts:
            with quiet_filesystem(tmp / "quiet", tmpfs=args.idle_on == "tmpfs") as fs:
                quiet = tmp / "quiet"
                progress(f"(b)(c) creating {args.files} labelled files on {fs}")
                make_tree(quiet / "indexed", small_sizes, content)
                idle = idle_agent(
                    tmp, quiet / "indexed", quiet / "usb", args.files, args.idle_seconds
                )
            idle["watched_filesystem"] = fs
            progress(f"(b)(c) {idle}")
            result["idle"] = {k: idle[k] for k in ("indexed_files", "watched_filesystem",
                              "startup_s", "idle_s", "cpu_s", "cpu_percent_of_one_core",
                              "other_processes_cores", "threads", "attribution")}  # fmt: skip
            result["memory"] = {k: idle[k] for k in ("indexed_files", "rss_mib",
                                "rss_mib_max_while_idle", "peak_rss_mib")}  # fmt: skip
            met["idle_cpu"] = idle["cpu_percent_of_one_core"] < TARGET_IDLE_CPU_PERCENT
            met["memory"] = idle["rss_mib"] < TARGET_RSS_MIB

        if "events" in parts:
            rates = [float(r) for r in args.rates.split(",")]
            burst = events(tmp, args.burst_files, rates, args.tries, content, rng)
            agent_rate, bare_rate = burst["agent_events_per_s"], burst["bare_events_per_s"]
            progress(f"(a) agent {agent_rate}/s, bare {bare_rate}/s")
            result["events"] = burst
            met["events"] = (
                agent_rate >= TARGET_EVENTS_PER_S and (burst["ratio"] or 0) >= TARGET_EVENTS_RATIO
            )

    result.update({
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "target": {
            "events_per_s": TARGET_EVENTS_PER_S,
            "events_ratio": TARGET_EVENTS_RATIO,
            "idle_cpu_percent": TARGET_IDLE_CPU_PERCENT,
            "rss_mib": TARGET_RSS_MIB,
            "hash_ratio": TARGET_HASH_RATIO,
        },
        "met": {**met, "all": all(met.values())},
    })  # fmt: skip
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
