"""Removing the agent: `exfilwatch-agent uninstall`.

Stops the service where systemd runs, delivers what the spool still holds, and removes
the unit, agent.yaml and the state directory that `install` created under the root.
An install protected with an uninstall token is only removed with that token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from agent.clock import SystemClock
from agent.config import load_config
from agent.enroll import split_hostport
from agent.errors import AgentError
from agent.identity import SIGNING_KEY, SPOOL, Identity
from agent.install import (
    UNINSTALL_HASH,
    InstallError,
    ServiceManager,
    Skip,
    UninstallRefused,
    enrolled_identity,
    on_host,
)
from agent.service_files import UNIT_NAME, Platform, layout
from agent.shipper import Shipper, ShipperSettings
from agent.signer import Signer
from agent.spool import Spool

logger = logging.getLogger(__name__)

FLUSH_S = 10.0
"""How long `uninstall` tries to deliver what is left in the spool."""


def uninstall(
    root: Path,
    uninstall_token: str | None,
    manager: ServiceManager | Skip,
    *,
    flush_s: float = FLUSH_S,
) -> str:
    """Stop and remove the service, deliver what the spool still holds, remove config and state.

    Refuses (UninstallRefused, nothing touched) when the install was protected with an
    uninstall token and `uninstall_token` does not match it.
    """
    lay = layout(Platform.LINUX)
    unit = on_host(root, lay.service_file)
    config = on_host(root, lay.config)
    token_file = config.parent / UNINSTALL_HASH
    state = on_host(root, lay.state_dir)
    if not any(p.exists() for p in (unit, config, token_file, state)):
        return f"exfilwatch-agent is not installed under {root}: nothing to do"
    _check_uninstall_token(token_file, uninstall_token)

    if not isinstance(manager, Skip) and unit.exists():
        manager.run("disable", "--now", UNIT_NAME)
    notes: list[str] = []
    identity = enrolled_identity(state)
    if identity is not None:
        notes.extend(_flush(identity, config, flush_s))
    try:
        if state.exists():
            shutil.rmtree(state)
        unit.unlink(missing_ok=True)
        if not isinstance(manager, Skip):
            manager.run("daemon-reload")
        for name in (lay.config.name, f".{lay.config.name}.tmp", f".{UNINSTALL_HASH}.tmp"):
            (config.parent / name).unlink(missing_ok=True)
        token_file.unlink(missing_ok=True)  # last: until here a retry still needs the token
        left = sorted(p.name for p in config.parent.iterdir()) if config.parent.exists() else []
        if config.parent.exists() and not left:
            config.parent.rmdir()
    except OSError as e:
        raise InstallError(f"cannot remove {e.filename}: {e.strerror}") from e
    if left:
        notes.append(f"left {config.parent} (it holds {', '.join(left)})")
    who = f"agent {identity.agent_id}" if identity is not None else "exfilwatch-agent"
    stopped = "" if isinstance(manager, Skip) else "service stopped and disabled; "
    return f"uninstalled {who}: {stopped}removed unit, config and state" + "".join(
        f"; {n}" for n in notes
    )


def _check_uninstall_token(path: Path, token: str | None) -> None:
    try:
        expected = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as e:
        raise UninstallRefused(f"cannot read {path} ({e}): refusing to uninstall") from e
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise UninstallRefused(f"{path} is damaged: refusing to uninstall")
    if not token:
        raise UninstallRefused("this agent was installed with an uninstall token")
    given = hashlib.sha256(token.encode()).hexdigest()
    if not hmac.compare_digest(given, expected):
        raise UninstallRefused("wrong uninstall token")


def _flush(identity: Identity, config: Path, flush_s: float) -> Sequence[str]:
    """Deliver what the spool holds, for up to `flush_s`; say what could not be delivered."""
    path = identity.state_dir / SPOOL
    if not path.exists():
        return ()
    try:
        spool = Spool.open(
            path, agent_id=identity.agent_id, signer=Signer.load(identity.state_dir / SIGNING_KEY)
        )
    except AgentError as e:
        if "locked" in str(e):
            raise InstallError(
                "the agent is still running (its spool is locked): stop it first, "
                "e.g. systemctl stop exfilwatch-agent"
            ) from e
        return (f"spool not readable, its events are lost: {e}",)
    try:
        if sum(spool.depth()):
            target = identity
            try:
                override = load_config(config, {}, check_paths=False).collector
            except AgentError:
                override = None
            if override:
                host, port = split_hostport(override)
                target = Identity(identity.agent_id, host, port, identity.state_dir)
            settings = ShipperSettings(call_timeout_s=min(flush_s, 15.0))
            shipper = Shipper(target, spool, SystemClock(), settings)
            try:
                shipper.start()
            finally:
                shipper.stop(flush_s)
        pending, sealed = spool.depth()
    except AgentError as e:
        return (f"could not deliver the spool: {e}",)
    finally:
        spool.close()
    if pending or sealed:
        return (
            f"{pending} pending event(s) and {sealed} sealed batch(es) never reached the "
            "collector and were deleted",
        )
    return ()
