"""What a running collector counts, as Prometheus reads it, and whether it is healthy.

`serve --metrics-listen HOST:PORT` serves two plain-HTTP paths for the machines around the
collector, not for people: `/metrics` (Prometheus text exposition format 0.0.4) and
`/healthz` (for a load balancer or a service check: 200 when the collector takes uploads,
503 while the rules' windows are being restored or when the database does not answer).
Neither carries a file name, a user name or anything an agent reported: counts only.
Bind it to an address only the monitoring network reaches (default: not served).

`Metrics` is the sans-I/O part: counters the ingest path bumps, and `render`, which writes
them beside gauges read at scrape time.
"""

from __future__ import annotations

import http.server
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from collector.records import StoreCounts

__all__ = ["Gauge", "Health", "Metrics", "MetricsServer", "store_gauges"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[a-z_][a-z0-9_]*")

_PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

COUNTERS: Mapping[str, str] = {
    "exfilwatch_batches_total": "Uploaded batches acknowledged, by outcome (stored, duplicate).",
    "exfilwatch_batches_refused_total": "Uploaded batches refused, by the refusal's kind.",
    "exfilwatch_events_stored_total": "Events stored (verified, durable, run through the rules).",
    "exfilwatch_alerts_opened_total": "Threshold and long-rule alerts opened by ingest.",
}
"""Every counter `Metrics.add` takes, with its help text."""


@dataclass(frozen=True)
class Gauge:
    """A value read when scraped."""

    name: str
    help: str
    samples: Iterable[tuple[Mapping[str, str], float]]
    """(labels, value) pairs."""


@dataclass(frozen=True)
class Health:
    ok: bool
    status: str
    """"ok", "restoring" or "error"."""
    detail: str = ""


class Metrics:
    """Counters, thread-safe. Labels are fixed words chosen by the collector (an outcome,
    an error class's name), never text from an agent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def add(self, name: str, value: float = 1, **labels: str) -> None:
        if name not in COUNTERS:
            raise ValueError(f"unknown counter {name!r}")
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + value

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0)

    def render(self, gauges: Iterable[Gauge] = ()) -> str:
        """The Prometheus text format: each counter (0 until counted) and gauge."""
        with self._lock:
            values = dict(self._values)
        lines: list[str] = []
        for name, text in COUNTERS.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
            samples = [(dict(k[1]), v) for k, v in sorted(values.items()) if k[0] == name]
            lines += _samples(name, samples or [({}, 0)])
        for gauge in gauges:
            lines += [f"# HELP {gauge.name} {gauge.help}", f"# TYPE {gauge.name} gauge"]
            lines += _samples(gauge.name, gauge.samples)
        return "\n".join(lines) + "\n"


def store_gauges(counts: StoreCounts, *, restoring: bool) -> list[Gauge]:
    """The store's counts (`SqliteStore.counts`) as gauges."""
    agents = [
        ({"state": "active"}, counts.agents - counts.revoked - counts.silent),
        ({"state": "silent"}, counts.silent),
        ({"state": "revoked"}, counts.revoked),
    ]
    alerts = [({"kind": k, "status": s}, n) for (k, s), n in sorted(counts.open_alerts.items())]
    return [
        Gauge("exfilwatch_agents", "Enrolled agents by state (silent: past the policy's"
              " silent_after).", agents),
        Gauge("exfilwatch_agents_spool_events", "Events waiting in the agents' spools, at"
              " their last heartbeat.", [({}, counts.spool_depth)]),
        Gauge("exfilwatch_agents_with_coverage_gaps", "Agents whose last heartbeat reported"
              " coverage gaps.", [({}, counts.agents_with_gaps)]),
        Gauge("exfilwatch_agent_cpu_percent_max", "The highest CPU use an agent reported at"
              " its last heartbeat, percent of one core.", [({}, counts.max_cpu_percent)]),
        Gauge("exfilwatch_agent_rss_bytes_max", "The largest resident memory an agent reported"
              " at its last heartbeat.", [({}, counts.max_rss_bytes)]),
        Gauge("exfilwatch_events_in_store", "Events stored in all.", [({}, counts.events)]),
        Gauge("exfilwatch_alerts_open", "Alerts new or in progress.", alerts),
        Gauge("exfilwatch_rules_restoring", "1 while the rules' windows are rebuilt at start"
              " (uploads wait).", [({}, 1 if restoring else 0)]),
    ]  # fmt: skip


def _samples(name: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> list[str]:
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"bad metric name {name!r}")
    out = []
    for labels, value in samples:
        text = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(labels.items()))
        number = _number(value)
        out.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")
    return out


def _number(value: float) -> str:
    """A sample value as the text format writes it: integers without a point, and the
    format's own spellings for what is not finite."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value == int(value) else repr(float(value))


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer:
    """`/metrics` and `/healthz` over plain HTTP on a thread; bound by the constructor (port 0
    picks a free port: `port`), serving after `start()` until `stop()`."""

    def __init__(
        self,
        host: str,
        port: int,
        render: Callable[[], str],
        health: Callable[[], Health],
    ) -> None:
        self._render = render
        self._health = health
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "exfilwatch-collector"
            sys_version = ""

            def do_GET(self) -> None:
                owner._get(self)

            def do_HEAD(self) -> None:
                owner._get(self, body=False)

            def log_message(self, format: str, *args: object) -> None:
                logger.debug("metrics: %s", format % args)

        self._httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def _get(self, req: http.server.BaseHTTPRequestHandler, *, body: bool = True) -> None:
        path = req.path.partition("?")[0]
        try:
            if path == "/metrics":
                status, ctype, text = 200, _PROMETHEUS_TEXT, self._render()
            elif path == "/healthz":
                h = self._health()
                doc = {"status": h.status, **({"detail": h.detail} if h.detail else {})}
                status, ctype, text = (200 if h.ok else 503), "application/json", json.dumps(doc)
            else:
                status, ctype, text = 404, "text/plain; charset=utf-8", "not found\n"
        except Exception:
            logger.exception("metrics: %s failed", path)
            status, ctype, text = 500, "text/plain; charset=utf-8", "internal error\n"
        data = text.encode()
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(data)))
        req.send_header("Cache-Control", "no-store")
        req.end_headers()
        if body:
            req.wfile.write(data)
