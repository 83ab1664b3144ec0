"""install / uninstall under a temporary root, against a real in-process collector."""

from __future__ import annotations

import io
import os
import plistlib
import shutil
import stat
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agent import service_files
from agent.cli import main
from agent.config import load_config
from agent.errors import ConfigError
from agent.events import Action, Event, EventId
from agent.identity import SIGNING_KEY, SPOOL, Identity
from agent.install import (
    InstallRequest,
    ServiceManagerError,
    Skip,
    Systemctl,
    choose_manager,
    install,
    plan_install,
)
from agent.service_files import UNIT_NAME
from agent.signer import Signer
from agent.spool import Spool
from agent.uninstall import uninstall
from tests.conftest import InProcessCollector

AGENT = Path(sys.executable).parent / "exfilwatch-agent"
UNIT = Path("etc/systemd/system") / UNIT_NAME
CONFIG = Path("etc/exfilwatch/agent.yaml")
STATE = Path("var/lib/exfilwatch")

Tree = dict[str, tuple[int, bytes | None, int]]


def tree(root: Path) -> Tree:
    """Every path under `root`: (mode, and for files content and mtime).

    Directory mtimes are left out: creating and removing an entry changes them.
    """
    found: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                found[str(path.relative_to(root))] = (st.st_mode, path.read_bytes(), st.st_mtime_ns)
            else:
                found[str(path.relative_to(root))] = (st.st_mode, None, 0)
    return found


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A workstation's root: the directories any Debian system has, plus a user's folder."""
    root = tmp_path / "root"
    for d in ("etc/systemd/system", "var/lib", "home/alice/Board", "media"):
        (root / d).mkdir(parents=True)
    return root


def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out, environ=env or {}), out.getvalue()


def install_args(c: InProcessCollector, root: Path, *extra: str) -> list[str]:
    return [
        "install",
        "--collector",
        c.enroll_address,
        "--root",
        str(root),
        "--hostname",
        "lt-0412",
        "--sensitive-root",
        "/home/alice/Board",
        "--destination",
        "removable:/media",
        *extra,
    ]


class FakeSystemctl:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def run(self, *args: str) -> None:
        self.calls.append(args)


# the unit


def test_unit_passes_systemd_analyze_verify(
    inproc_collector: InProcessCollector, root: Path
) -> None:
    systemd_analyze = shutil.which("systemd-analyze")
    if systemd_analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    rc, _ = run(*install_args(inproc_collector, root, "--token", inproc_collector.token()))
    assert rc == 0
    unit = root / UNIT
    assert f"ExecStart={AGENT} run --config /etc/exfilwatch/agent.yaml" in unit.read_text()
    # verify checks the directives and that ExecStart's program exists and is executable.
    result = subprocess.run(
        [systemd_analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert UNIT_NAME not in result.stderr, result.stderr  # not even a warning
    # The hardening, scored offline: 2.8 with CAP_SYS_ADMIN for fanotify ("OK" is below 5;
    # fail above 3).
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--threshold=30", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout.splitlines()[-1:]


def test_unit_has_the_service_contract() -> None:
    unit = service_files.render_unit(str(AGENT), "/etc/exfilwatch/agent.yaml")
    lines = set(unit.splitlines())
    for directive in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=60",
        "Restart=always",
        "RestartSec=5",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "StateDirectory=exfilwatch",
        "ConfigurationDirectory=exfilwatch",
        "CPUQuota=20%",
        "MemoryMax=256M",
        "CapabilityBoundingSet=CAP_DAC_READ_SEARCH CAP_SYS_PTRACE CAP_SYS_ADMIN",
        "RestartPreventExitStatus=78",
        "ProtectKernelTunables=yes",
        "PrivateMounts=yes",
    ):
        assert directive in lines
    # Only the state directory is writable: raising the inotify watch limit from the
    # service takes a drop-in for that one file (the unit says how, commented out).
    assert not any(line.startswith("ReadWritePaths=") for line in lines)
    assert "#   ReadWritePaths=/proc/sys/fs/inotify/max_user_watches" in lines
    assert not any(line.startswith("AmbientCapabilities=") for line in lines)  # root service


def test_fanotify_is_allowed_back_after_the_privileged_calls_are_denied() -> None:
    """fanotify_init/fanotify_mark are in @privileged: the allow line must come after."""
    unit = service_files.render_unit(str(AGENT), "/etc/exfilwatch/agent.yaml").splitlines()
    filters = [line for line in unit if line.startswith("SystemCallFilter=")]
    assert filters == [
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources",
        "SystemCallFilter=fanotify_init fanotify_mark",
    ]


def test_exec_start_quotes_what_systemd_would_split_or_expand() -> None:
    unit = service_files.render_unit("/opt/ex filwatch/bin/agent", "/etc/x%y/$HOME.yaml")
    assert 'ExecStart="/opt/ex filwatch/bin/agent" run --config /etc/x%%y/$$HOME.yaml' in unit


# install


def test_dry_run_prints_every_file_and_writes_and_enrols_nothing(
    inproc_collector: InProcessCollector, root: Path
) -> None:
    before = tree(root)
    rc, text = run(
        *install_args(inproc_collector, root, "--token", inproc_collector.token(), "--dry-run"),
        "--uninstall-token",
        "s3cret",
    )
    assert rc == 0
    assert tree(root) == before
    assert inproc_collector.store.list_agents() == []
    assert "==> /etc/exfilwatch/agent.yaml (mode 0600) <==" in text
    assert f"==> /etc/systemd/system/{UNIT_NAME} (mode 0644) <==" in text
    assert "==> /etc/exfilwatch/uninstall.sha256 (mode 0600) <==" in text
    assert "s3cret" not in text
    assert "- /home/alice/Board" in text and "Type=notify" in text
    assert f"enrol with {inproc_collector.enroll_address} as lt-0412" in text


def test_install_enrols_writes_private_config_and_is_quiet(
    inproc_collector: InProcessCollector, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, text = run(*install_args(inproc_collector, root, "--token", inproc_collector.token()))
    assert rc == 0
    assert text.count("\n") == 1 and text.startswith("installed: agent ag-")
    assert "not started (--root" in text
    assert capsys.readouterr().err == ""
    config = root / CONFIG
    st = config.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == ((0, 0) if os.geteuid() == 0 else (st.st_uid, st.st_gid))
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    loaded = load_config(config, {}, check_paths=False)
    assert loaded.state_dir == Path("/var/lib/exfilwatch")
    assert loaded.sensitive_roots == (Path("/home/alice/Board"),)
    assert [(d.path, d.destination_class.value) for d in loaded.destinations] == [
        (Path("/media"), "removable")
    ]
    identity = Identity.load(root / STATE)
    assert [a.agent_id for a in inproc_collector.store.list_agents()] == [identity.agent_id]
    assert identity.agent_id in text


def test_install_twice_is_quiet_needs_no_token_and_changes_nothing(
    inproc_collector: InProcessCollector, root: Path
) -> None:
    args = install_args(inproc_collector, root)
    assert run(*args, "--token", inproc_collector.token())[0] == 0
    before = tree(root)
    rc, text = run(*args)  # no token: already enrolled
    assert rc == 0
    assert "already enrolled" in text and "nothing changed" in text
    assert tree(root) == before  # same content, modes and mtimes: nothing rewritten
    assert len(inproc_collector.store.list_agents()) == 1


def test_install_rewrites_only_what_differs(
    inproc_collector: InProcessCollector, root: Path
) -> None:
    assert run(*install_args(inproc_collector, root, "--token", inproc_collector.token()))[0] == 0
    unit_before = (root / UNIT).stat().st_mtime_ns
    (root / "home/bob").mkdir()
    rc, text = run(*install_args(inproc_collector, root, "--sensitive-root", "/home/bob"))
    assert rc == 0 and "wrote /etc/exfilwatch/agent.yaml;" in text
    assert (root / UNIT).stat().st_mtime_ns == unit_before
    roots = load_config(root / CONFIG, {}, check_paths=False).sensitive_roots
    assert roots == (Path("/home/alice/Board"), Path("/home/bob"))


def test_an_edited_config_is_kept_when_no_folders_are_given(
    inproc_collector: InProcessCollector, root: Path
) -> None:
    assert run(*install_args(inproc_collector, root, "--token", inproc_collector.token()))[0] == 0
    edited = (root / CONFIG).read_text() + "queue_size: 500\n"
    (root / CONFIG).write_text(edited)
    rc, text = run("install", "--collector", inproc_collector.enroll_address, "--root", str(root))
    assert rc == 0 and "nothing changed" in text
    assert (root / CONFIG).read_text() == edited


def test_defaults_are_home_and_media(inproc_collector: InProcessCollector, root: Path) -> None:
    request = InstallRequest(collector=inproc_collector.enroll_address, hostname="h")
    (config,) = [f for f in plan_install(request, root).files if f.path.name == "agent.yaml"]
    assert b"sensitive_roots:\n- /home\n" in config.content
    assert b"- path: /media\n  class: removable\n" in config.content
    shutil.rmtree(root / "media")
    with pytest.raises(ConfigError, match="pass --destination"):
        plan_install(request, root)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--destination", "usb:/media", "CLASS one of removable"),
        ("--destination", "removable:media", "expected an absolute path"),
        ("--sensitive-root", "/tmp/secret", "PrivateTmp=yes"),
        ("--sensitive-root", "/srv/nowhere", "no such directory under"),
    ],
)
def test_bad_folders_exit_2_naming_the_flag(
    root: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    before = tree(root)
    rc, _ = run("install", "--collector", "127.0.0.1:1", "--root", str(root), flag, value)
    assert rc == 2
    err = capsys.readouterr().err
    assert flag in err and message in err
    assert tree(root) == before


def test_first_install_without_a_token_says_how(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _ = run("install", "--collector", "127.0.0.1:1", "--root", str(root))
    assert rc == 2
    assert "pass --token, --token-file or EXFILWATCH_TOKEN" in capsys.readouterr().err


def test_a_refused_enrolment_leaves_nothing_behind(
    inproc_collector: InProcessCollector, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree(root)
    token = inproc_collector.token(ttl_s=-1)
    rc, _ = run(*install_args(inproc_collector, root, "--token", token))
    assert rc == 1
    assert "expired" in capsys.readouterr().err
    assert tree(root) == before


def test_systemctl_enables_and_starts_where_systemd_runs(
    inproc_collector: InProcessCollector, root: Path
) -> None:
    request = InstallRequest(
        collector=inproc_collector.enroll_address,
        hostname="h",
        token=inproc_collector.token(),
        sensitive_roots=("/home/alice/Board",),
    )
    systemctl = FakeSystemctl()
    summary = install(request, root, systemctl)
    assert systemctl.calls == [
        ("daemon-reload",),
        ("enable", UNIT_NAME),
        ("restart", UNIT_NAME),
    ]
    assert "service enabled and (re)started" in summary
    systemctl.calls.clear()
    install(request, root, systemctl)
    assert systemctl.calls == [("enable", "--now", UNIT_NAME)]
    systemctl.calls.clear()
    uninstall(root, None, systemctl)
    assert systemctl.calls == [("disable", "--now", UNIT_NAME), ("daemon-reload",)]


def test_systemctl_only_for_the_running_system(tmp_path: Path) -> None:
    assert choose_manager(Path("/"), start=False, booted=True) == Skip("not started (--no-start)")
    assert isinstance(choose_manager(tmp_path, start=True, booted=True), Skip)
    assert choose_manager(Path("/"), start=True, booted=False) == Skip(
        "not started (systemd is not running here)"
    )
    assert isinstance(choose_manager(Path("/"), start=True, booted=True), Systemctl)


def test_a_failing_systemctl_is_loud() -> None:
    def fake(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "Unit file is masked.\n")

    with pytest.raises(ServiceManagerError, match=r"systemctl restart x failed.*masked"):
        Systemctl(fake).run("restart", "x")


# other platforms


def test_macos_launch_daemon_is_a_valid_plist(capsys: pytest.CaptureFixture[str]) -> None:
    rc, text = run(
        "install", "--collector", "c.corp:7444", "--platform", "macos", "--root", "/nonexistent"
    )
    assert rc == 0
    header = "==> /Library/LaunchDaemons/org.exfilwatch.agent.plist (mode 0644) <==\n"
    body = text.split(header)[1].split("\n==> ")[0]
    plist = plistlib.loads(body.encode())
    assert plist["Label"] == "org.exfilwatch.agent"
    config = "/Library/Application Support/exfilwatch/agent.yaml"
    assert plist["ProgramArguments"][1:] == ["run", "--config", config]
    assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True
    assert plistlib.loads(plistlib.dumps(plist)) == plist
    assert "launchctl bootstrap system" in text


def test_windows_service_definition_names_the_service_and_command_line() -> None:
    rc, text = run(
        "install",
        "--collector",
        "c.corp:7444",
        "--platform",
        "windows",
        "--sensitive-root",
        r"C:\Users\alice\Board Papers",
        "--destination",
        "removable:E:\\",
    )
    assert rc == 0
    header = r"==> C:\Program Files\exfilwatch\exfilwatch-agent-service.xml"
    body = text.split(header)[1].split("\n", 1)[1].split("\n==> ")[0]
    service = ET.fromstring(body)  # noqa: S314 (our own output)
    assert service.findtext("id") == "exfilwatch-agent"
    assert service.findtext("executable") == (
        r"C:\Program Files\exfilwatch\Scripts\exfilwatch-agent.exe"
    )
    assert service.findtext("arguments") == r"run --config C:\ProgramData\exfilwatch\agent.yaml"
    onfailure = service.find("onfailure")
    assert onfailure is not None and onfailure.get("action") == "restart"
    assert r"- C:\Users\alice\Board Papers" in text
    assert 'exfilwatch-agent-service.exe" install' in text


def test_windows_arguments_with_spaces_are_quoted() -> None:
    xml = service_files.render_winsw("agent.exe", r"C:\Program Data\a b.yaml", r"C:\logs")
    arguments = ET.fromstring(xml).findtext("arguments")  # noqa: S314 (our own output)
    assert arguments == r'run --config "C:\Program Data\a b.yaml"'


# uninstall


def test_install_then_uninstall_leaves_nothing_behind(
    inproc_collector: InProcessCollector, root: Path
) -> None:
    before = tree(root)
    args = install_args(inproc_collector, root, "--token", inproc_collector.token())
    assert run(*args, "--uninstall-token", "s3cret")[0] == 0
    assert (root / UNIT).exists() and (root / STATE / "identity.json").exists()
    rc, text = run("uninstall", "--root", str(root), "--uninstall-token", "s3cret")
    assert rc == 0
    assert text.startswith("uninstalled agent ag-") and text.count("\n") == 1
    assert tree(root) == before
    rc, text = run("uninstall", "--root", str(root))
    assert rc == 0 and "not installed" in text


@pytest.mark.parametrize("token", [None, "guess", ""])
def test_uninstall_without_the_right_token_refuses_and_removes_nothing(
    inproc_collector: InProcessCollector,
    root: Path,
    capsys: pytest.CaptureFixture[str],
    token: str | None,
) -> None:
    args = install_args(inproc_collector, root, "--token", inproc_collector.token())
    assert run(*args, "--uninstall-token", "s3cret")[0] == 0
    before = tree(root)
    extra = [] if token is None else ["--uninstall-token", token]
    rc, _ = run("uninstall", "--root", str(root), *extra)
    assert rc == 3
    err = capsys.readouterr().err
    assert "refus" in err or "uninstall token" in err
    assert "Tip: pass the token given at install time" in err
    assert tree(root) == before
    # The token also works from the environment.
    rc, _ = run("uninstall", "--root", str(root), env={"EXFILWATCH_UNINSTALL_TOKEN": "s3cret"})
    assert rc == 0


def test_a_second_install_keeps_the_uninstall_token(
    inproc_collector: InProcessCollector, root: Path
) -> None:
    args = install_args(inproc_collector, root, "--token", inproc_collector.token())
    assert run(*args, "--uninstall-token", "s3cret")[0] == 0
    assert run(*install_args(inproc_collector, root))[0] == 0
    assert run("uninstall", "--root", str(root))[0] == 3


def _spool_one_event(state: Path) -> str:
    identity = Identity.load(state)
    event_id = str(uuid.uuid4())
    with Spool.open(
        state / SPOOL, agent_id=identity.agent_id, signer=Signer.load(state / SIGNING_KEY)
    ) as spool:
        spool.append(
            [Event(EventId(event_id), 1_700_000_000 * 10**9, Action.AGENT_START, "h", "0")]
        )
    return event_id


def test_uninstall_delivers_what_the_spool_holds(
    inproc_collector: InProcessCollector, root: Path
) -> None:
    assert run(*install_args(inproc_collector, root, "--token", inproc_collector.token()))[0] == 0
    event_id = _spool_one_event(root / STATE)
    summary = uninstall(root, None, Skip("test"))
    assert "never reached" not in summary
    assert event_id in {e.event_id for e in inproc_collector.store.list_events()}


def test_uninstall_says_what_could_not_be_delivered(
    inproc_collector: InProcessCollector, root: Path
) -> None:
    assert run(*install_args(inproc_collector, root, "--token", inproc_collector.token()))[0] == 0
    _spool_one_event(root / STATE)
    inproc_collector.bound.server.stop(grace=None).wait()
    summary = uninstall(root, None, Skip("test"), flush_s=0.5)
    # Sealed into a signed batch while trying, as a stopping agent does.
    assert "0 pending event(s) and 1 sealed batch(es) never reached the collector" in summary
    assert not (root / STATE).exists()


def test_uninstall_refuses_while_the_agent_holds_its_spool(
    inproc_collector: InProcessCollector, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(*install_args(inproc_collector, root, "--token", inproc_collector.token()))[0] == 0
    state = root / STATE
    identity = Identity.load(state)
    signer = Signer.load(state / SIGNING_KEY)
    with Spool.open(state / SPOOL, agent_id=identity.agent_id, signer=signer) as spool:
        spool.append([Event(EventId(str(uuid.uuid4())), 1, Action.AGENT_START, "h", "0")])
        before = tree(root)
        rc, _ = run("uninstall", "--root", str(root))
        assert rc == 1
        assert "still running" in capsys.readouterr().err
        assert tree(root) == before


def test_uninstall_leaves_files_it_did_not_write(
    inproc_collector: InProcessCollector, root: Path
) -> None:
    assert run(*install_args(inproc_collector, root, "--token", inproc_collector.token()))[0] == 0
    (root / "etc/exfilwatch/policy.yaml").write_text("labels: [a]\n")
    rc, text = run("uninstall", "--root", str(root))
    assert rc == 0
    assert "left" in text and "policy.yaml" in text
    assert sorted(p.name for p in (root / "etc/exfilwatch").iterdir()) == ["policy.yaml"]
