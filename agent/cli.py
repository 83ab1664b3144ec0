"""exfilwatch-agent command line: enroll, run, check-config, install, uninstall, status.

The one place agent errors reach a person: `main` prints diagnostics and
returns the exit code (1, or 2 for configuration errors).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from agent import __version__, install, status, uninstall
from agent.clock import SystemClock
from agent.config import load_config
from agent.enroll import enroll, split_hostport
from agent.errors import AgentError, ConfigError, RevokedError
from agent.identity import REVOKED, Identity
from agent.sdnotify import SdNotifier
from agent.service import AgentService
from agent.service_files import Platform

logger = logging.getLogger("agent")


def cmd_enroll(args: argparse.Namespace, out: TextIO, environ: Mapping[str, str]) -> int:
    token = args.token
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"--token-file: {e}") from e
    token = token or environ.get("EXFILWATCH_TOKEN", "")
    if not token:
        raise ConfigError("no enrolment token: pass --token, --token-file or EXFILWATCH_TOKEN")
    identity = enroll(args.collector, token, args.state, args.hostname or socket.gethostname())
    out.write(f"enrolled as {identity.agent_id}; collector agent port {identity.target}\n")
    return 0


def cmd_check_config(args: argparse.Namespace, out: TextIO, environ: Mapping[str, str]) -> int:
    config = load_config(args.config, environ)
    out.write(
        f"{args.config}: ok ({len(config.sensitive_roots)} sensitive roots, "
        f"{len(config.destinations)} destinations, state {config.state_dir})\n"
    )
    return 0


def cmd_run(args: argparse.Namespace, out: TextIO, environ: Mapping[str, str]) -> int:
    config = load_config(args.config, environ)
    _set_level(config.log_level if not args.verbose else "DEBUG")
    identity = Identity.load(config.state_dir)
    if (config.state_dir / REVOKED).exists():
        raise RevokedError(f"agent {identity.agent_id} was revoked by the collector")
    if config.collector:
        host, port = split_hostport(config.collector)
        identity = dataclasses.replace(identity, collector_host=host, agent_port=port)
    service = AgentService(
        config, identity, SystemClock(), notifier=SdNotifier.from_environ(environ)
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.should_exit.set())
    try:
        service.startup()
        out.write(
            f"exfilwatch-agent {__version__} running as {identity.agent_id}, "
            f"shipping to {identity.target}\n"
        )
        out.flush()
        service.run()
    finally:
        service.shutdown()
    if service.revoked:
        raise RevokedError(f"agent {identity.agent_id} was revoked by the collector")
    return 1 if service.failure else 0


def cmd_install(args: argparse.Namespace, out: TextIO, environ: Mapping[str, str]) -> int:
    _quiet(args, environ)
    request = install.InstallRequest(
        collector=args.collector,
        hostname=args.hostname or socket.gethostname(),
        token=install.read_secret(
            args.token, args.token_file, environ, "EXFILWATCH_TOKEN", "--token"
        ),
        platform=Platform(args.platform),
        sensitive_roots=tuple(args.sensitive_root),
        destinations=tuple(args.destination),
        uninstall_token=install.read_secret(
            args.uninstall_token, None, environ, install.UNINSTALL_TOKEN_ENV, "--uninstall-token"
        ),
        executable=args.executable,
        start=not args.no_start,
    )
    if args.dry_run or request.platform is not Platform.LINUX:
        out.write(install.format_plan(install.plan_install(request, args.root), args.root))
        return 0
    manager = install.choose_manager(args.root, start=request.start)
    out.write(install.install(request, args.root, manager) + "\n")
    return 0


def cmd_uninstall(args: argparse.Namespace, out: TextIO, environ: Mapping[str, str]) -> int:
    _quiet(args, environ)
    token = install.read_secret(
        args.uninstall_token, None, environ, install.UNINSTALL_TOKEN_ENV, "--uninstall-token"
    )
    manager = install.choose_manager(args.root, start=True)
    out.write(uninstall.uninstall(args.root, token, manager) + "\n")
    return 0


def cmd_status(args: argparse.Namespace, out: TextIO, environ: Mapping[str, str]) -> int:
    if not args.config.exists():
        raise ConfigError(f"{args.config} does not exist: is the agent installed? (see install)")
    config = load_config(args.config, environ, check_paths=False)
    report = status.collect(config, SystemClock().wall_ns())
    out.write(report.to_json() + "\n" if args.json else report.to_text())
    return report.state.exit_code


def _quiet(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """install/uninstall print one summary line; their progress logs only with -v."""
    if not args.verbose and not environ.get("EXFILWATCH_LOGLEVEL"):
        _set_level("WARNING")


Command = Callable[[argparse.Namespace, TextIO, Mapping[str, str]], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exfilwatch-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("enroll", help="enrol with a collector and store the identity")
    p.add_argument("--collector", required=True, help="the collector's enrolment HOST:PORT")
    p.add_argument("--token", default="", help="enrolment token (or --token-file)")
    p.add_argument("--token-file", type=Path, help="read the token from a file")
    p.add_argument("--state", type=Path, required=True, help="agent state directory")
    p.add_argument("--hostname", help="name to enrol under (default: this host's name)")
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("run", help="watch, detect and ship")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("install", help="enrol and install as a service (systemd)")
    p.add_argument("--collector", required=True, help="the collector's enrolment HOST:PORT")
    p.add_argument("--token", help="enrolment token (or --token-file); not needed once enrolled")
    p.add_argument("--token-file", type=Path, help="read the enrolment token from a file")
    p.add_argument("--hostname", help="name to enrol under (default: this host's name)")
    p.add_argument(
        "--root", type=Path, default=Path("/"), metavar="DIR", help="install under DIR (default /)"
    )
    p.add_argument("--dry-run", action="store_true", help="print every file; write nothing")
    p.add_argument(
        "--sensitive-root", action="append", default=[], metavar="DIR", help="(default /home)"
    )
    p.add_argument(
        "--destination", action="append", default=[], metavar="CLASS:DIR", help="(removable:/media)"
    )
    p.add_argument(
        "--platform",
        choices=[str(v) for v in Platform],
        default=str(Platform.LINUX),
        help="windows, macos: print their service files for review (implies --dry-run)",
    )
    p.add_argument("--no-start", action="store_true", help="do not enable or start the service")
    p.add_argument("--uninstall-token", metavar="TOKEN", help="uninstall will require it")
    p.add_argument("--executable", metavar="PATH", help="the agent program (default: this one)")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("uninstall", help="stop and remove the service, its config and state")
    p.add_argument("--root", type=Path, default=Path("/"), metavar="DIR", help="installed under")
    p.add_argument("--uninstall-token", metavar="TOKEN", help="the one given to install, if any")
    p.set_defaults(func=cmd_uninstall)

    p = sub.add_parser("status", help="enrolled? running? delivering?")
    p.add_argument("--config", type=Path, default=Path("/etc/exfilwatch/agent.yaml"))
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_status)
    return parser


def _set_level(level: str) -> None:
    pkg = logging.getLogger("agent")
    pkg.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")


def _guard_watchdog_warning() -> None:
    """watchdog's inotify reader warns "Callback with id ... already exists" on `cp -r`.

    Under `python -W error` that warning is raised in the reader thread and kills it,
    silently ending every watch; keep it a warning whatever the interpreter flags say.
    """
    warnings.filterwarnings("ignore", "Callback with id", RuntimeWarning)


def main(
    argv: Sequence[str] | None = None,
    out: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    args = build_parser().parse_args(argv)
    _guard_watchdog_warning()
    env = os.environ if environ is None else environ
    pkg = logging.getLogger("agent")
    if not pkg.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        pkg.addHandler(handler)
    _set_level("DEBUG" if args.verbose else env.get("EXFILWATCH_LOGLEVEL", "INFO").upper())
    func: Command = args.func
    try:
        return func(args, out or sys.stdout, env)
    except AgentError as e:
        if args.verbose:
            logger.exception("failed")
        sys.stderr.write(f"exfilwatch-agent: error: {e.diagnostics()}\n")
        return e.exit_code
