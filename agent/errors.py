"""Agent error hierarchy. Foreign exceptions are translated where they enter.

AgentError
├── ConfigError         bad or missing configuration (exit code 2)
├── EnrollError         enrolment refused or collector not trusted
├── StateError          agent state directory missing or damaged
│   └── ReportedStoreError  the record of reported copies cannot be read or written
├── LabelError          a file's label could not be read
├── FanotifyError       fanotify unavailable (not root, kernel, container): fall back
├── SpoolError          the durable spool failed
├── ShipError           a batch could not be delivered (retried)
│   └── RejectedError   the collector refused a batch for good
├── RevokedError        the collector revoked this agent (exit 78: do not restart)
└── InstallError        install / uninstall failed (agent.install)
    ├── ServiceManagerError   systemctl failed
    └── UninstallRefused      missing or wrong uninstall token (exit 3)
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent reports to a person."""

    exit_code = 1
    hint = ""

    def diagnostics(self) -> str:
        """The message shown on the command line, with a hint when there is one."""
        text = str(self)
        return f"{text}\nTip: {self.hint}" if self.hint else text


class ConfigError(AgentError):
    exit_code = 2


class EnrollError(AgentError):
    pass


class StateError(AgentError):
    hint = "enrol first: exfilwatch-agent enroll --collector HOST:PORT --token TOKEN --state DIR"


class ReportedStoreError(StateError):
    hint = "check the state directory's disk and permissions; the file is rebuilt when deleted"


class LabelError(AgentError):
    pass


class FanotifyError(AgentError):
    hint = "run the agent as root for reliable attribution; without it, attribution is best effort"

    def __init__(self, message: str, *, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno
        """The kernel's errno when a system call refused (0 otherwise): ENOSPC is the marks
        limit, ENOENT a path that went away."""


class SpoolError(AgentError):
    pass


class ShipError(AgentError):
    pass


class RejectedError(ShipError):
    pass


class RevokedError(AgentError):
    exit_code = 78  # EX_CONFIG; the systemd unit sets RestartPreventExitStatus=78
    hint = "enrol again with a new token: exfilwatch-agent enroll ... (a new key is generated)"
