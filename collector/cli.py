"""exfilwatch-collector command line: init, token, serve, agents, events, alerts, policy,
users, trail (the last two and alert triage in `collector.cli_console`).

The one place collector errors reach a person: `main` prints diagnostics and
returns the exit code (1, or 2 for configuration errors).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TextIO

from collector import __version__, cli_console, pki
from collector import policy as policy_mod
from collector.audit import verify_store
from collector.decoding import default_workers
from collector.directory import load_directory
from collector.dryrun import dry_run
from collector.enroll import Enrollment
from collector.errors import CollectorError, ConfigError, StoreError
from collector.ingest import IngestSettings
from collector.ingestproc import IngestConfig, IngestProcess
from collector.metrics import Gauge, Health, Metrics, MetricsServer, store_gauges
from collector.monitor import Monitor
from collector.policy import Policy, load_policy, parse_duration
from collector.procsetup import log_to_stderr
from collector.records import AgentRecord
from collector.render import display_path, display_text, human_bytes
from collector.rpc import Handlers
from collector.server import create_server, split_hostport
from collector.store import SqliteStore
from collector.trail import Trail
from collector.views import agent_json, alert_json, alert_text, event_json, event_line

if TYPE_CHECKING:
    from collector.web.server import ConsoleServer

logger = logging.getLogger("collector")

DB_FILE = "collector.db"
LISTEN_FILE = "listen.json"


def duration_arg(text: str) -> int:
    """A CLI duration (30m, 24h, 7d) in nanoseconds."""
    try:
        return policy_mod.parse_duration(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def workers_arg(text: str) -> int:
    """A worker count: 0 to 64."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 64:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 64, got {text!r}")
    return n


SYNCHRONOUS: Final[Literal["FULL"]] = "FULL"
"""Every connection `serve` opens: an acknowledged batch is deleted by the agent, so its
commit must be durable."""


def open_store(data: Path) -> SqliteStore:
    if not (data / pki.CA_CERT).exists():
        raise ConfigError(
            f"{data} is not an initialised collector data directory",
        )
    return SqliteStore.open(data / DB_FILE, synchronous=SYNCHRONOUS)


def cmd_init(args: argparse.Namespace, out: TextIO) -> int:
    fp = pki.init_pki(args.data, args.hostname)
    SqliteStore.open(args.data / DB_FILE).close()
    out.write(f"initialised {args.data}\nCA fingerprint sha256:{fp}\n")
    out.write(f"next: exfilwatch-collector token create --data {args.data}\n")
    return 0


def cmd_token_create(args: argparse.Namespace, out: TextIO) -> int:
    authority = pki.Authority.load(args.data)
    token = pki.new_token(authority.fingerprint)
    now = time.time_ns()
    store = open_store(args.data)
    try:
        store.add_token(
            token.token_id, pki.secret_hash(token.secret), now, now + args.ttl, args.uses
        )
    finally:
        store.close()
    if args.json:
        expires = now + args.ttl
        out.write(json.dumps({"token": str(token), "uses": args.uses, "expires_at_ns": expires}))
        out.write("\n")
    else:
        out.write(f"{token}\n")
    return 0


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    policy = load_policy(args.policy)
    authority = pki.Authority.load(args.data)
    store = open_store(args.data)
    ingest: IngestProcess | None = None
    try:
        directory = load_directory(args.directory) if args.directory else None
        settings = IngestSettings(max_future_skew_ns=args.max_future_skew)
        metrics = Metrics()
        ingest = IngestProcess(
            IngestConfig(
                database=args.data / DB_FILE,
                synchronous=SYNCHRONOUS,
                policy_document=policy.document,
                policy_source=str(args.policy),
                settings=settings,
                directory=directory,
                decode_workers=args.decode_workers,
                log_level=logging.getLogger("collector").getEffectiveLevel(),
            ),
            metrics,
        )
        ingest.start()
        holder: dict[str, int] = {}
        handlers = Handlers(
            ingest,
            Enrollment(store, authority),
            authority,
            time.time_ns,
            lambda: holder["agent"],
            policy=policy,
        )
        enroll_listen = args.enroll_listen or _next_port(args.listen)
        bound = create_server(handlers, authority, listen=args.listen, enroll_listen=enroll_listen)
        holder["agent"] = bound.agent_port
        host = args.listen.rpartition(":")[0]
        addresses = {
            "agents": f"{host}:{bound.agent_port}",
            "enroll": f"{enroll_listen.rpartition(':')[0]}:{bound.enroll_port}",
        }
        console = _console(args, store, policy)
        if console is not None:
            addresses["console"] = console.url
        monitoring = _metrics_server(args, store, ingest, metrics, policy)
        if monitoring is not None:
            addresses["metrics"] = monitoring.url
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        # Listen first: the rules' windows are rebuilt meanwhile, and only uploads wait.
        restoring = ingest.restore_in_background(on_failure=stop.set)
        silent_after = policy.agents.silent_after_ns
        monitor = Monitor(
            store, silent_after, time.time_ns, interval_s=min(60.0, silent_after / 4e9)
        )
        if console is not None:
            console.start()
        if monitoring is not None:
            monitoring.server.start()
        bound.server.start()
        monitor.start()
        tmp = args.data / (LISTEN_FILE + ".tmp")
        tmp.write_text(json.dumps(addresses) + "\n")
        os.replace(tmp, args.data / LISTEN_FILE)
        out.write(
            f"exfilwatch-collector {__version__} listening: agents {addresses['agents']} "
            f"(mutual TLS), enrolment {addresses['enroll']}; data {args.data}; "
            f"policy {policy.revision}\n"
        )
        if console is not None:
            out.write(f"console: {console.url}\n")
        if monitoring is not None:
            out.write(f"metrics: {monitoring.url}/metrics, health {monitoring.url}/healthz\n")
        out.flush()
        stop.wait()
        logger.info("stopping")
        if console is not None:
            console.stop()
        if monitoring is not None:
            monitoring.server.stop()
        monitor.stop()
        bound.server.stop(grace=5).wait()
        restoring.join()
        if ingest.restore_error is not None:
            raise StoreError(f"stopped: {ingest.restore_error}")
    finally:
        if ingest is not None:
            ingest.close()
        store.close()
    return 0


@dataclass(frozen=True)
class _Monitoring:
    server: MetricsServer
    url: str


def _metrics_server(
    args: argparse.Namespace,
    store: SqliteStore,
    ingest: IngestProcess,
    metrics: Metrics,
    policy: Policy,
) -> _Monitoring | None:
    """`/metrics` and `/healthz` (collector.metrics), bound but not started; None unless
    --metrics-listen."""
    if args.metrics_listen is None:
        return None
    host, port = split_hostport(args.metrics_listen, "--metrics-listen")
    silent_after = policy.agents.silent_after_ns

    build = Gauge(
        "exfilwatch_build_info", "The collector's version.", [({"version": __version__}, 1)]
    )

    def render() -> str:
        counts = store.counts(time.time_ns() - silent_after)
        return metrics.render([build, *store_gauges(counts, restoring=ingest.restoring)])

    def health() -> Health:
        if ingest.restore_error is not None:
            return Health(ok=False, status="error", detail="the rules' windows were not restored")
        if ingest.restoring:
            return Health(ok=False, status="restoring")
        try:
            store.read_with(lambda con: con.execute("SELECT 1 FROM schema_version").fetchone())
        except StoreError:
            return Health(ok=False, status="error", detail="the database does not answer")
        return Health(ok=True, status="ok")

    try:
        server = MetricsServer(host, port, render, health)
    except OSError as e:
        raise ConfigError(f"--metrics-listen {args.metrics_listen}: {e.strerror or e}") from e
    shown = f"[{host}]" if ":" in host else host
    return _Monitoring(server, f"http://{shown}:{server.port}")


def _console(args: argparse.Namespace, store: SqliteStore, policy: Policy) -> ConsoleServer | None:
    """The web console, bound but not started; None with --no-console."""
    if args.no_console:
        return None
    if (args.console_cert is None) != (args.console_key is None):
        raise ConfigError("--console-cert and --console-key go together")
    try:
        from collector.web.server import open_console
    except ImportError as e:
        raise ConfigError(
            f"the console cannot start ({e}); install exfilwatch[collector] or serve --no-console"
        ) from e
    return open_console(
        store, policy, args.data / DB_FILE, listen=args.console_listen,
        certfile=args.console_cert or args.data / pki.SERVER_CERT,
        keyfile=args.console_key or args.data / pki.SERVER_KEY,
    )  # fmt: skip


def _next_port(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + 1}" if port.isdigit() and int(port) else f"{host}:0"


def _emit(
    rows: Sequence[dict[str, object]], lines: Sequence[str], args: argparse.Namespace, out: TextIO
) -> int:
    if args.json:
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")
    else:
        for line in lines:
            out.write(display_text(line) + "\n")
    return 0


def cmd_agents_list(args: argparse.Namespace, out: TextIO) -> int:
    store = open_store(args.data)
    try:
        agents = store.list_agents()
    finally:
        store.close()
    lines = [
        f"{a.agent_id}  {a.hostname}  v{a.agent_version}  last seen "
        f"{_ago(a.last_seen_ns)}  spool {a.spool_depth}{_cost(a)}"
        f"{'  REVOKED' if a.revoked else ''}"
        for a in agents
    ]
    return _emit([agent_json(a) for a in agents], lines or ["no agents enrolled"], args, out)


def _cost(a: AgentRecord) -> str:
    if not a.rss_bytes:  # not reported yet, or by an older agent
        return ""
    return f"  cpu {a.cpu_percent:.1f}%  mem {human_bytes(a.rss_bytes)}"


def cmd_agents_revoke(args: argparse.Namespace, out: TextIO) -> int:
    store = open_store(args.data)
    try:
        store.revoke_agent(args.agent_id)
        # After the change, as the console's revoke does (collector.web.views.admin): a
        # failed revoke leaves no entry claiming it happened.
        Trail(store).append(
            None,
            actor=cli_console.default_actor(),
            action="agent_revoke",
            target=f"agent:{args.agent_id}",
            detail={},
            now_ns=time.time_ns(),
        )
    finally:
        store.close()
    out.write(f"revoked {args.agent_id}: its next call is refused\n")
    return 0


def _ago(ns: int) -> str:
    if not ns:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9)) + "Z"


def cmd_events_list(args: argparse.Namespace, out: TextIO) -> int:
    store = open_store(args.data)
    try:
        events = store.list_events(limit=args.limit)
    finally:
        store.close()
    return _emit([event_json(e) for e in events], [event_line(e) for e in events], args, out)


def cmd_alerts_list(args: argparse.Namespace, out: TextIO) -> int:
    store = open_store(args.data)
    try:
        alerts = store.list_alerts(status=args.status, limit=args.limit)
    finally:
        store.close()
    lines = [
        f"#{a.alert_id}  {a.severity:<8} {a.status:<14} {a.kind:<9} {a.reason}" for a in alerts
    ]
    rows = [alert_json(a, evidence=None) for a in alerts]
    return _emit(rows, lines or ["no alerts"], args, out)


def cmd_alerts_show(args: argparse.Namespace, out: TextIO) -> int:
    store = open_store(args.data)
    try:
        alert, events = store.get_alert(args.id)
    finally:
        store.close()
    if args.json:
        out.write(json.dumps(alert_json(alert, evidence=events), sort_keys=True) + "\n")
    else:
        out.write(alert_text(alert, events))
    return 0


def cmd_audit_verify(args: argparse.Namespace, out: TextIO) -> int:
    if not (args.data / DB_FILE).exists():
        raise ConfigError(f"{args.data} holds no collector database")
    report = verify_store(args.data / DB_FILE)
    if args.json:
        for f in report.findings:
            row = {"agent_id": f.agent_id, "batch_seq": f.batch_seq, "event_id": f.event_id}
            out.write(json.dumps({**row, "problem": f.problem}, sort_keys=True) + "\n")
    else:
        for finding in report.findings:
            out.write(f"FAIL {finding}\n")
        verdict = "all verify" if report.ok else f"{len(report.findings)} problem(s)"
        out.write(
            f"audit: {report.events} events in {report.batches} batches from "
            f"{report.agents} agents: {verdict}\n"
        )
    return 0 if report.ok else 1


def cmd_policy_check(args: argparse.Namespace, out: TextIO) -> int:
    policy = load_policy(args.policy)
    count = len(policy.rules) + len(policy.long_rules)
    out.write(f"{args.policy}: ok, revision {policy.revision}, {count} rules\n")
    return 0


def cmd_policy_dry_run(args: argparse.Namespace, out: TextIO) -> int:
    policy = load_policy(args.policy)
    directory = load_directory(args.directory) if args.directory else None
    try:
        span = parse_duration(args.since)
    except ValueError as e:
        raise ConfigError(f"--since: {e}") from e
    started = time.monotonic()
    report = dry_run(
        args.data / DB_FILE, policy, since_ns=time.time_ns() - span, directory=directory
    )
    took = time.monotonic() - started
    rules = report.by_rule()
    if args.json:
        for alert in report.alerts:
            row = {
                "rule": alert.rule,
                "who": alert.who,
                "severity": alert.severity,
                "at_ns": alert.at_ns,
                "evidence": alert.evidence,
                "explanation": alert.explanation,
            }
            out.write(json.dumps(row, sort_keys=True) + "\n")
        return 0
    out.write(
        f"dry-run of {args.policy} (revision {policy.revision}) over {report.events} events "
        f"of the last {args.since}, {took:.1f} s; real alerts untouched\n"
    )
    for rule in [r.name for r in policy.rules] + [r.name for r in policy.long_rules]:
        alerts = rules.get(rule, [])
        who = sorted({a.who for a in alerts})
        out.write(f"{rule}: {len(alerts)} alerts for {len(who)}\n")
        for alert in alerts:
            who_text = display_path(alert.who.encode())
            out.write(
                f"  {alert.severity:8} {who_text}: {display_path(alert.explanation.encode())}\n"
            )
    return 0


Command = Callable[[argparse.Namespace, TextIO], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exfilwatch-collector", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", type=Path, required=True, help="collector data directory")

    def json_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser("init", help="create CA, server certificate and keys")
    data_arg(p)
    p.add_argument("--hostname", action="append", default=[], help="extra name for the certificate")
    p.set_defaults(func=cmd_init)

    token = sub.add_parser("token", help="enrolment tokens").add_subparsers(
        dest="sub", required=True
    )
    p = token.add_parser("create", help="print a new enrolment token")
    data_arg(p)
    json_arg(p)
    p.add_argument("--ttl", type=duration_arg, default="24h", help="lifetime (default 24h)")
    p.add_argument("--uses", type=int, default=1, help="how many agents may use it (default 1)")
    p.set_defaults(func=cmd_token_create)

    p = sub.add_parser("serve", help="run the collector")
    data_arg(p)
    p.add_argument("--listen", default="0.0.0.0:7443", help="agent port, mutual TLS (HOST:PORT)")
    p.add_argument("--enroll-listen", help="enrolment port (default: the agent port + 1)")
    p.add_argument("--policy", type=Path, required=True)
    p.add_argument(
        "--max-future-skew", type=duration_arg, default="10m",
        help="batches dated further ahead of this clock raise clock_skew_future (default 10m)",
    )  # fmt: skip
    p.add_argument(
        "--directory", type=Path,
        help="users' departments and watchlists for the long rules (CSV or LDIF export)",
    )  # fmt: skip
    p.add_argument(
        "--decode-workers", type=workers_arg, default=default_workers(),
        help="processes that verify and decode uploads beside the ingest process's writer;"
        " 0: its reader thread does"
        f" (default: one per CPU but one, at most 4: {default_workers()} here)",
    )  # fmt: skip
    p.add_argument("--no-console", action="store_true", help="do not serve the web console")
    p.add_argument(
        "--console-listen", default="127.0.0.1:8443",
        help="web console, HTTPS (HOST:PORT; port 0 picks a free one; default 127.0.0.1:8443)",
    )  # fmt: skip
    p.add_argument("--console-cert", type=Path, help="console certificate (default: the server's)")
    p.add_argument("--console-key", type=Path, help="console private key (with --console-cert)")
    p.add_argument(
        "--metrics-listen",
        help="serve /metrics (Prometheus) and /healthz over plain HTTP here (HOST:PORT;"
        " port 0 picks a free one; default: not served). Counts only, no names.",
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)

    agents = sub.add_parser("agents", help="enrolled agents").add_subparsers(
        dest="sub", required=True
    )
    p = agents.add_parser("list")
    data_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_agents_list)
    p = agents.add_parser("revoke", help="refuse every later call of an agent")
    data_arg(p)
    p.add_argument("agent_id")
    p.set_defaults(func=cmd_agents_revoke)

    events = sub.add_parser("events", help="stored events").add_subparsers(
        dest="sub", required=True
    )
    p = events.add_parser("list")
    data_arg(p)
    json_arg(p)
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_events_list)

    alerts = sub.add_parser("alerts", help="alerts").add_subparsers(dest="sub", required=True)
    p = alerts.add_parser("list")
    data_arg(p)
    json_arg(p)
    p.add_argument("--status", choices=["new", "in_progress", "resolved", "false_positive"])
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_alerts_list)
    p = alerts.add_parser("show")
    data_arg(p)
    json_arg(p)
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_alerts_show)
    cli_console.add_alert_commands(alerts, data_arg)

    audit = sub.add_parser("audit", help="re-prove stored events").add_subparsers(
        dest="sub", required=True
    )
    p = audit.add_parser(
        "verify", help="re-verify every stored batch and event (exit 1 if any fails)"
    )
    data_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_audit_verify)

    policy = sub.add_parser("policy", help="policy files").add_subparsers(dest="sub", required=True)
    p = policy.add_parser("check", help="validate a policy file")
    p.add_argument("--policy", type=Path, required=True)
    p.set_defaults(func=cmd_policy_check)
    p = policy.add_parser(
        "dry-run", help="replay stored events against a candidate policy; nothing is changed"
    )
    data_arg(p)
    json_arg(p)
    p.add_argument("--policy", type=Path, required=True, help="the candidate policy")
    p.add_argument("--since", default="30d", help="how far back to replay (e.g. 30d)")
    p.add_argument("--directory", type=Path, help="departments and watchlists (CSV or LDIF)")
    p.set_defaults(func=cmd_policy_dry_run)
    cli_console.add_commands(sub, data_arg, json_arg)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = "DEBUG" if args.verbose else os.environ.get("EXFILWATCH_LOGLEVEL", "INFO").upper()
    log_to_stderr(level if level in logging.getLevelNamesMapping() else "INFO")
    func: Command = args.func
    try:
        return func(args, out or sys.stdout)
    except CollectorError as e:
        if args.verbose:
            logger.exception("failed")
        sys.stderr.write(f"exfilwatch-collector: error: {e.diagnostics()}\n")
        return e.exit_code
