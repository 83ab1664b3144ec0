"""What `exfilwatch-agent install` writes and where: per-platform paths, and the files
rendered as text (agent.yaml, the systemd unit, and the Windows (WinSW) and macOS (launchd)
service definitions it prints for review).

Pure functions of their arguments; agent/install.py decides when to write the results.
"""

from __future__ import annotations

import plistlib
import string
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import assert_never

import yaml

from agent.events import DestinationClass

SERVICE_NAME = "exfilwatch-agent"
UNIT_NAME = f"{SERVICE_NAME}.service"
LAUNCHD_LABEL = "org.exfilwatch.agent"
WINSW_NAME = f"{SERVICE_NAME}-service"
"""WinSW wrapper base name: WinSW.exe renamed to this + '.exe' reads this + '.xml' beside it."""


class Platform(StrEnum):
    LINUX = "linux"
    WINDOWS = "windows"
    MACOS = "macos"


@dataclass(frozen=True)
class Layout:
    """Where things live on one platform, as paths on the target system."""

    config: PurePath
    state_dir: PurePath
    service_file: PurePath
    log: PurePath
    executable: str
    """The agent program the service runs."""
    sensitive_roots: tuple[str, ...]
    """Defaults when no --sensitive-root is given."""
    destinations: tuple[tuple[DestinationClass, str], ...]
    """Defaults when no --destination is given."""


def layout(platform: Platform) -> Layout:
    removable = DestinationClass.REMOVABLE
    match platform:
        case Platform.LINUX:
            return Layout(
                config=PurePosixPath("/etc/exfilwatch/agent.yaml"),
                state_dir=PurePosixPath("/var/lib/exfilwatch"),
                service_file=PurePosixPath("/etc/systemd/system") / UNIT_NAME,
                log=PurePosixPath("/var/log/journal"),
                # This installation's console script: sys.executable's bin dir, not resolved
                # (a virtual environment's python is a symlink out of it).
                executable=str(Path(sys.executable).parent / "exfilwatch-agent"),
                sensitive_roots=("/home",),
                destinations=((removable, "/media"),),
            )
        case Platform.WINDOWS:
            windata = PureWindowsPath(r"C:\ProgramData\exfilwatch")
            return Layout(
                config=windata / "agent.yaml",
                state_dir=windata / "state",
                service_file=PureWindowsPath(r"C:\Program Files\exfilwatch") / f"{WINSW_NAME}.xml",
                log=windata / "logs",
                executable=r"C:\Program Files\exfilwatch\Scripts\exfilwatch-agent.exe",
                sensitive_roots=(r"C:\Users",),
                destinations=((removable, "E:\\"),),
            )
        case Platform.MACOS:
            data = PurePosixPath("/Library/Application Support/exfilwatch")
            return Layout(
                config=data / "agent.yaml",
                state_dir=data / "state",
                service_file=PurePosixPath("/Library/LaunchDaemons") / f"{LAUNCHD_LABEL}.plist",
                log=PurePosixPath("/Library/Logs/exfilwatch-agent.log"),
                executable="/opt/exfilwatch/bin/exfilwatch-agent",
                sensitive_roots=("/Users",),
                destinations=((removable, "/Volumes"),),
            )
        case _:
            assert_never(platform)


def _template(name: str) -> str:
    return (resources.files("agent") / "templates" / name).read_text(encoding="utf-8")


def systemd_quote(arg: str) -> str:
    """One ExecStart= word: specifiers (%), variables ($) and quotes escaped, quoted if needed."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    if escaped and not any(c.isspace() or c in "\"'\\;" for c in escaped):
        return escaped
    return f'"{escaped}"'


def render_unit(executable: str, config_path: str) -> str:
    """The hardened systemd unit (templates/exfilwatch-agent.service)."""
    words = [executable, "run", "--config", config_path]
    exec_start = " ".join(systemd_quote(w) for w in words)
    return string.Template(_template(UNIT_NAME)).substitute(exec_start=exec_start)


def render_config(
    *,
    state_dir: str,
    sensitive_roots: Sequence[str],
    destinations: Sequence[tuple[DestinationClass, str]],
    config_path: str,
) -> str:
    """agent.yaml with the install's choices; everything else keeps its default."""
    data = {
        "state_dir": state_dir,
        "sensitive_roots": list(sensitive_roots),
        "destinations": [{"path": path, "class": klass.value} for klass, path in destinations],
        "log_level": "INFO",
    }
    header = (
        "# exfilwatch agent configuration, written by `exfilwatch-agent install`.\n"
        "# install keeps this file unless given --sensitive-root or --destination; the other\n"
        "# keys (labels, path_rules, batch, spool, hashing, queue_size) are documented in\n"
        "# configs/agent.yaml. After editing, check it and restart the agent:\n"
        f"#   exfilwatch-agent check-config --config {config_path}\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def _windows_quote(arg: str) -> str:
    """Quote one argument for a Windows command line (CommandLineToArgvW rules)."""
    if arg and not any(c in arg for c in ' \t"'):
        return arg
    out, backslashes = ['"'], 0
    for c in arg:
        if c == "\\":
            backslashes += 1
            continue
        if c == '"':
            out.append("\\" * (2 * backslashes + 1) + '"')
        else:
            out.append("\\" * backslashes + c)
        backslashes = 0
    out.append("\\" * (2 * backslashes) + '"')
    return "".join(out)


def render_winsw(executable: str, config_path: str, log_dir: str) -> str:
    """A WinSW service definition (https://github.com/winsw/winsw, v2 XML format).

    The agent is a console program that stops on Ctrl+C, not a Service Control Manager
    service, so `sc.exe create` alone would have Windows kill it after 30 s; WinSW is the
    wrapper. It restarts the agent 5 s after any failure exit (Restart=always's analogue).
    """
    service = ET.Element("service")
    fields = {
        "id": SERVICE_NAME,
        "name": "exfilwatch agent",
        "description": "exfilwatch data-loss monitor agent",
        "executable": executable,
        "arguments": " ".join(_windows_quote(a) for a in ("run", "--config", config_path)),
        "startmode": "Automatic",
        "stoptimeout": "30 sec",
        "resetfailure": "1 hour",
        "logpath": log_dir,
    }
    for tag, text in fields.items():
        ET.SubElement(service, tag).text = text
    ET.SubElement(service, "onfailure", action="restart", delay="5 sec")
    log = ET.SubElement(service, "log", mode="roll-by-size")
    ET.SubElement(log, "sizeThreshold").text = "10240"
    ET.SubElement(log, "keepFiles").text = "8"
    ET.indent(service)
    # No "--" in the comment: XML forbids it there.
    comment = (
        "<!-- exfilwatch agent for WinSW, written by exfilwatch-agent install (platform "
        f"windows).\n     Save as {WINSW_NAME}.xml beside WinSW-x64.exe renamed "
        f"{WINSW_NAME}.exe. -->\n"
    )
    return comment + ET.tostring(service, encoding="unicode") + "\n"


def render_launchd(executable: str, config_path: str, log_path: str) -> bytes:
    """A launchd LaunchDaemon property list: started at boot, kept alive, throttled."""
    plist = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": [executable, "run", "--config", config_path],
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": 5,
        "ExitTimeOut": 30,
        "ProcessType": "Background",
        "Nice": 10,
        "Umask": 0o077,
        "StandardOutPath": log_path,
        "StandardErrorPath": log_path,
    }
    return plistlib.dumps(plist, sort_keys=False)
