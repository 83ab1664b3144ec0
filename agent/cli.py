"""exfilwatch-agent command line: enroll, run, check-config.

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

from agent import __version__
from agent.clock import SystemClock
from agent.config import load_config
from agent.enroll import enroll, split_hostport
from agent.errors import AgentError, ConfigError, RevokedError
from agent.identity import REVOKED, Identity
from agent.service import AgentService

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
    service = AgentService(config, identity, SystemClock())
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
