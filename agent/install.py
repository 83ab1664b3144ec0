"""Installing the agent as a workstation service: `exfilwatch-agent install`.

install = enrol once + agent.yaml + a hardened systemd unit, then systemctl where systemd
runs. `--platform windows|macos` renders the equivalent service files for review. Every
path is taken under a root (default /), so all of it runs in a temporary directory too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Protocol

from agent import service_files
from agent.config import load_config
from agent.enroll import enroll, parse_token
from agent.errors import AgentError, ConfigError
from agent.events import DestinationClass
from agent.identity import REVOKED, Identity
from agent.service_files import UNIT_NAME, Layout, Platform, layout

logger = logging.getLogger(__name__)

UNINSTALL_TOKEN_ENV = "EXFILWATCH_UNINSTALL_TOKEN"  # noqa: S105 (a variable name)
"""Where `install` and `uninstall` also look for the uninstall token."""
UNINSTALL_HASH = "uninstall.sha256"
"""Beside agent.yaml: SHA-256 (hex) of the uninstall token given at install time."""


class InstallError(AgentError):
    """A step of install or uninstall failed; what was done before it stays done."""


class ServiceManagerError(InstallError):
    hint = "see `systemctl status exfilwatch-agent` and `journalctl -u exfilwatch-agent`"


class UninstallRefused(InstallError):
    """The install was protected with an uninstall token and the right one was not given."""

    exit_code = 3
    hint = f"pass the token given at install time: --uninstall-token or {UNINSTALL_TOKEN_ENV}"


def on_host(root: Path, target: PurePath) -> Path:
    """Where a target-system path is under `root`."""
    return root / target.relative_to(target.anchor)


@dataclass(frozen=True)
class InstallRequest:
    """What `exfilwatch-agent install` was asked to do (flags, parsed but not yet checked)."""

    collector: str
    """The collector's enrolment HOST:PORT."""
    hostname: str
    token: str | None = None
    platform: Platform = Platform.LINUX
    sensitive_roots: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    """CLASS:DIR, as given to --destination."""
    uninstall_token: str | None = None
    executable: str | None = None
    start: bool = True


@dataclass(frozen=True)
class PlannedFile:
    path: PurePath
    """On the target system."""
    mode: int | None
    """None on Windows, where the steps say how to restrict access."""
    content: bytes


@dataclass(frozen=True)
class Plan:
    platform: Platform
    files: tuple[PlannedFile, ...]
    enrolled: Identity | None
    """Already enrolled under the root: kept, no token needed."""
    steps: tuple[str, ...]
    """What else happens (or, off Linux, what the administrator runs), in order."""


class ServiceManager(Protocol):
    def run(self, *args: str) -> None:
        """`systemctl ARGS`; raises ServiceManagerError."""
        ...


@dataclass(frozen=True)
class Skip:
    """No service manager is used, and why (for the summary line)."""

    reason: str


class Systemctl:
    def __init__(self, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run):
        self._run = run

    def run(self, *args: str) -> None:
        command = ["systemctl", *args]
        try:
            result = self._run(command, capture_output=True, text=True, check=False)
        except OSError as e:
            raise ServiceManagerError(f"cannot run {' '.join(command)}: {e}") from e
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise ServiceManagerError(
                f"{' '.join(command)} failed (exit {result.returncode}): {detail}"
            )


def choose_manager(root: Path, *, start: bool, booted: bool | None = None) -> ServiceManager | Skip:
    """systemctl when installing into the running system under systemd; else why not.

    `booted` defaults to sd_booted(3)'s test: /run/systemd/system exists.
    """
    if booted is None:
        booted = Path("/run/systemd/system").is_dir()
    if not start:
        return Skip("not started (--no-start)")
    if root.resolve() != Path("/"):
        return Skip(f"not started (--root {root})")
    if not booted:
        return Skip("not started (systemd is not running here)")
    return Systemctl()


def read_secret(
    value: str | None, file: Path | None, environ: Mapping[str, str], env: str, flag: str
) -> str | None:
    """A secret from --FLAG, --FLAG-file or the environment, in that order."""
    if file is not None:
        try:
            return file.read_text(encoding="utf-8").strip() or None
        except OSError as e:
            raise ConfigError(f"{flag}-file: {e}") from e
    return value or environ.get(env) or None


# install


def plan_install(request: InstallRequest, root: Path) -> Plan:
    """Check the request and decide every file and step; writes and enrols nothing."""
    lay = layout(request.platform)
    if request.token is not None:
        parse_token(request.token)  # a mistyped token fails here, before anything is written
    if request.platform is not Platform.LINUX:
        return _plan_elsewhere(request, lay)
    if not root.is_dir():
        raise ConfigError(f"--root {root}: not a directory")
    executable = request.executable or lay.executable
    if not PurePosixPath(executable).is_absolute() or not os.access(executable, os.X_OK):
        raise InstallError(f"{executable} is not an executable: is exfilwatch installed?")
    files = []
    kept = ""
    config = on_host(root, lay.config)
    if request.sensitive_roots or request.destinations or not config.exists():
        text = _config_text(request, lay, root)
        files.append(PlannedFile(lay.config, 0o600, text.encode()))
    else:
        _check_kept_config(config, lay)
        kept = f"keep {lay.config} (no --sensitive-root or --destination given)"
    unit = service_files.render_unit(executable, str(lay.config))
    files.append(PlannedFile(lay.service_file, 0o644, unit.encode()))
    if request.uninstall_token:
        digest = hashlib.sha256(request.uninstall_token.encode()).hexdigest()
        files.append(PlannedFile(lay.config.parent / UNINSTALL_HASH, 0o600, f"{digest}\n".encode()))

    enrolled = enrolled_identity(on_host(root, lay.state_dir))
    steps = [kept] if kept else []
    if enrolled is None:
        need = "" if request.token else " (needs --token, --token-file or EXFILWATCH_TOKEN)"
        steps.append(
            f"enrol with {request.collector} as {request.hostname}, "
            f"identity in {lay.state_dir}{need}"
        )
    else:
        steps.append(f"keep the enrolment: agent {enrolled.agent_id} in {lay.state_dir}")
    steps.append(
        f"systemctl daemon-reload; systemctl enable --now {UNIT_NAME} (where systemd runs)"
    )
    return Plan(Platform.LINUX, tuple(files), enrolled, tuple(steps))


def install(request: InstallRequest, root: Path, manager: ServiceManager | Skip) -> str:
    """Enrol (once), write the files whose content differs, start the service; one line back."""
    if request.platform is not Platform.LINUX:
        raise ConfigError(f"--platform {request.platform}: rendered for review only (--dry-run)")
    if root.resolve() == Path("/") and os.geteuid() != 0:
        raise InstallError("install writes /etc and /var/lib: run it as root")
    plan = plan_install(request, root)
    lay = layout(plan.platform)
    identity = plan.enrolled or _enroll(request, on_host(root, lay.state_dir))
    owner_root = os.geteuid() == 0
    changed = [f.path for f in plan.files if _write_if_changed(root, f, owner_root=owner_root)]
    started = _start(manager, unit_changed=lay.service_file in changed, changed=bool(changed))
    what = ", ".join(str(p) for p in changed) if changed else "nothing changed"
    verb = "enrolled" if plan.enrolled is None else "already enrolled"
    return f"installed: agent {identity.agent_id} ({verb}); wrote {what}; {started}"


def _plan_elsewhere(request: InstallRequest, lay: Layout) -> Plan:
    if request.uninstall_token:
        raise ConfigError("--uninstall-token: only for --platform linux")
    executable = request.executable or lay.executable
    config = _config_text(request, lay, None)
    state, token = str(lay.state_dir), "--token-file token.txt"
    if request.platform is Platform.WINDOWS:
        service = service_files.render_winsw(executable, str(lay.config), str(lay.log))
        winsw = lay.service_file.with_suffix(".exe")
        data = lay.config.parent
        files = (
            PlannedFile(lay.config, None, config.encode()),
            PlannedFile(lay.service_file, None, service.encode()),
        )
        steps = (
            f'"{executable}" enroll --collector {request.collector} {token} --state "{state}"',
            f'icacls "{data}" /inheritance:r /grant:r SYSTEM:(OI)(CI)F '
            "/grant:r Administrators:(OI)(CI)F",
            f"copy WinSW-x64.exe (https://github.com/winsw/winsw) to {winsw}",
            f'"{winsw}" install',
            f'"{winsw}" start',
        )
        return Plan(request.platform, files, None, steps)
    plist = service_files.render_launchd(executable, str(lay.config), str(lay.log))
    files = (
        PlannedFile(lay.config, 0o600, config.encode()),
        PlannedFile(lay.service_file, 0o644, plist),
    )
    mac_steps = (
        f'sudo "{executable}" enroll --collector {request.collector} {token} --state "{state}"',
        f"sudo chown root:wheel {lay.service_file}",
        f"sudo launchctl bootstrap system {lay.service_file}",
    )
    return Plan(request.platform, files, None, mac_steps)


def _config_text(request: InstallRequest, lay: Layout, root: Path | None) -> str:
    """agent.yaml from the flags (or the defaults), checked to load with `load_config`."""
    pure: Callable[[str], PurePath]
    pure = PureWindowsPath if request.platform is Platform.WINDOWS else PurePosixPath
    roots = [_directory(pure, text, "--sensitive-root", root) for text in request.sensitive_roots]
    destinations = [_destination(pure, text, root) for text in request.destinations]
    if not roots:
        roots = [p for p in lay.sensitive_roots if root is None or _exists(root, pure(p))]
        if not roots:
            raise ConfigError(
                f"the default sensitive root {lay.sensitive_roots[0]} does not exist under "
                f"{root}: pass --sensitive-root DIR"
            )
    if not destinations:
        destinations = [d for d in lay.destinations if root is None or _exists(root, pure(d[1]))]
        if not destinations:
            raise ConfigError(
                f"the default destination {lay.destinations[0][1]} does not exist under "
                f"{root}: pass --destination CLASS:DIR"
            )
    text = service_files.render_config(
        state_dir=str(lay.state_dir),
        sensitive_roots=roots,
        destinations=destinations,
        config_path=str(lay.config),
    )
    with tempfile.TemporaryDirectory() as tmp:  # a bug here must not reach a workstation
        path = Path(tmp) / "agent.yaml"
        path.write_text(text, encoding="utf-8")
        load_config(path, {}, check_paths=False)
    return text


def _directory(pure: Callable[[str], PurePath], text: str, flag: str, root: Path | None) -> str:
    path = pure(text)
    if not path.is_absolute():
        raise ConfigError(f"{flag} {text}: expected an absolute path")
    if root is None:  # rendered for another machine: nothing to check here
        return str(path)
    for private in _PRIVATE_TMP:
        if path == private or private in path.parents:
            raise ConfigError(
                f"{flag} {text}: the service runs with PrivateTmp=yes and cannot see {private}"
            )
    if not _exists(root, path):
        raise ConfigError(f"{flag} {text}: no such directory under {root}")
    return str(path)


_PRIVATE_TMP = (PurePosixPath("/tmp"), PurePosixPath("/var/tmp"))  # noqa: S108 (refused, not used)


def _destination(
    pure: Callable[[str], PurePath], text: str, root: Path | None
) -> tuple[DestinationClass, str]:
    klass, sep, directory = text.partition(":")
    classes = [c.value for c in DestinationClass]
    if not sep or klass not in classes:
        raise ConfigError(
            f"--destination {text}: expected CLASS:DIR with CLASS one of {', '.join(classes)}"
        )
    return DestinationClass(klass), _directory(pure, directory, "--destination", root)


def _exists(root: Path, path: PurePath) -> bool:
    return on_host(root, path).is_dir()


def _check_kept_config(config: Path, lay: Layout) -> None:
    """An existing agent.yaml is kept; it must load and keep state where the unit allows."""
    loaded = load_config(config, {}, check_paths=False)
    if PurePosixPath(loaded.state_dir) != lay.state_dir:
        raise ConfigError(
            f"{config}: state_dir is {loaded.state_dir}, but the service may only write "
            f"{lay.state_dir} (StateDirectory=); fix it or pass --sensitive-root/--destination "
            "to rewrite the file"
        )


def enrolled_identity(state_dir: Path) -> Identity | None:
    """The identity already enrolled in `state_dir`, unless there is none or it was revoked."""
    if (state_dir / REVOKED).exists():
        return None
    try:
        return Identity.load(state_dir)
    except AgentError:
        return None


def _enroll(request: InstallRequest, state_dir: Path) -> Identity:
    if not request.token:
        raise ConfigError(
            f"not enrolled yet ({state_dir} holds no identity): "
            "pass --token, --token-file or EXFILWATCH_TOKEN"
        )
    created = not state_dir.exists()
    try:
        return enroll(request.collector, request.token, state_dir, request.hostname)
    except BaseException:
        if created:  # a failed first install leaves no half-made state behind
            shutil.rmtree(state_dir, ignore_errors=True)
        raise


def _write_if_changed(root: Path, planned: PlannedFile, *, owner_root: bool) -> bool:
    """Write atomically unless the file already has this content, mode and owner."""
    path = on_host(root, planned.path)
    mode = planned.mode if planned.mode is not None else 0o600
    try:
        st = path.stat()
        if (
            stat.S_IMODE(st.st_mode) == mode
            and (not owner_root or (st.st_uid, st.st_gid) == (0, 0))
            and path.read_bytes() == planned.content
        ):
            return False
    except FileNotFoundError:
        pass
    except OSError as e:
        raise InstallError(f"cannot read {path}: {e.strerror}") from e
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(
            mode=0o700 if planned.mode == 0o600 else 0o755, parents=True, exist_ok=True
        )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            if owner_root:
                os.fchown(fd, 0, 0)
            os.write(fd, planned.content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InstallError(f"cannot write {path}: {e.strerror}") from e
    logger.info("wrote %s", path)
    return True


def _start(manager: ServiceManager | Skip, *, unit_changed: bool, changed: bool) -> str:
    if isinstance(manager, Skip):
        return manager.reason
    if unit_changed:
        manager.run("daemon-reload")
    if changed:  # new unit or config: (re)start it with them
        manager.run("enable", UNIT_NAME)
        manager.run("restart", UNIT_NAME)
        return "service enabled and (re)started"
    manager.run("enable", "--now", UNIT_NAME)
    return "service enabled and running"


def format_plan(plan: Plan, root: Path) -> str:
    """The --dry-run listing: every file with its path, mode and content, then the steps."""
    where = "" if plan.platform is not Platform.LINUX or root == Path("/") else f" under {root}"
    lines = [f"# exfilwatch-agent install --platform {plan.platform}{where}: nothing written"]
    for f in plan.files:
        mode = "mode: restrict with icacls, below" if f.mode is None else f"mode {f.mode:04o}"
        lines.append(f"==> {f.path} ({mode}) <==")
        lines.append(f.content.decode("utf-8").rstrip("\n"))
    lines.append("==> steps <==")
    lines.extend(f"{i}. {step}" for i, step in enumerate(plan.steps, 1))
    return "\n".join(lines) + "\n"
