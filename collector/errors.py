"""Collector error hierarchy. Foreign exceptions are translated where they enter.

CollectorError
├── ConfigError             bad config or policy file (exit code 2)
├── StoreError              the database failed
├── NotFoundError           no such alert / agent / token
├── EnrollmentError         token unknown, expired, used up; bad proof
├── UserError               bad user name, role or password; user exists (exit code 2)
├── AuthError               login refused: one message for every reason
│   └── ThrottledError          too many recent failures for this account or address
├── TriageError             illegal status change, missing reason, bad assignee or note (exit 2)
├── TrailError              a trail entry that cannot be recorded (exit code 2)
├── DecoderUnavailableError a decode worker died or is stopping  -> UNAVAILABLE (retried)
├── IngestUnavailableError  the ingest process died or is stopping -> UNAVAILABLE (retried)
└── IngestError             a batch was refused (nothing stored)
    ├── MalformedBatchError     cannot be parsed / fields invalid      -> INVALID_ARGUMENT
    ├── UnknownAgentError       no enrolled agent for this identity    -> UNAUTHENTICATED
    ├── RevokedAgentError       the agent was revoked                  -> PERMISSION_DENIED
    ├── SignatureError          signature does not verify              -> UNAUTHENTICATED
    ├── IdentityMismatchError   batch agent id != TLS identity         -> PERMISSION_DENIED
    ├── ReplayConflictError     used batch_seq with different bytes    -> ALREADY_EXISTS
    ├── SequenceGapError        batch_seq skips ahead                  -> FAILED_PRECONDITION
    └── ChainError              prev_batch_digest does not match       -> FAILED_PRECONDITION
"""

from __future__ import annotations


class CollectorError(Exception):
    """Base of every error the collector reports to a person or an agent."""

    exit_code = 1
    hint = ""

    def diagnostics(self) -> str:
        text = str(self)
        return f"{text}\nTip: {self.hint}" if self.hint else text


class ConfigError(CollectorError):
    exit_code = 2


class StoreError(CollectorError):
    pass


class NotFoundError(CollectorError):
    pass


class EnrollmentError(CollectorError):
    pass


class UserError(CollectorError):
    """A console user cannot be added or changed as asked (bad input)."""

    exit_code = 2


class AuthError(CollectorError):
    """A login was refused. The message never says why: unknown user, wrong password
    and locked account read the same, so a guesser learns nothing."""


class ThrottledError(AuthError):
    """Too many failed logins for the account name or the client address lately."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TriageError(CollectorError):
    """An alert decision the rules refuse (status transition, reason, assignee, note)."""

    exit_code = 2


class TrailError(CollectorError):
    """A trail entry that cannot be recorded (unknown action, bad actor or detail)."""

    exit_code = 2


class DecoderUnavailableError(CollectorError):
    """An upload could not be verified and decoded for want of a worker (one died, or the
    collector is stopping). Not the agent's fault: it sends the batch again."""


class IngestUnavailableError(CollectorError):
    """The ingest process (collector.ingestproc) died or is stopping while it held the
    call. Nothing was acknowledged: the agent sends the batch again."""


class IngestError(CollectorError):
    """A batch was refused. `security` marks refusals that raise a security alert."""

    security = True


class MalformedBatchError(IngestError):
    pass


class UnknownAgentError(IngestError):
    pass


class RevokedAgentError(IngestError):
    pass


class SignatureError(IngestError):
    pass


class IdentityMismatchError(IngestError):
    pass


class ReplayConflictError(IngestError):
    pass


class SequenceGapError(IngestError):
    pass


class ChainError(IngestError):
    pass
