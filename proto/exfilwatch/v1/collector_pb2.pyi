from exfilwatch.v1 import events_pb2 as _events_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("token_id", "token_secret", "signing_public_key", "csr_der", "hostname", "agent_version", "proof")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SECRET_FIELD_NUMBER: _ClassVar[int]
    SIGNING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    CSR_DER_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    token_secret: str
    signing_public_key: bytes
    csr_der: bytes
    hostname: str
    agent_version: str
    proof: bytes
    def __init__(self, token_id: _Optional[str] = ..., token_secret: _Optional[str] = ..., signing_public_key: _Optional[bytes] = ..., csr_der: _Optional[bytes] = ..., hostname: _Optional[str] = ..., agent_version: _Optional[str] = ..., proof: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("agent_id", "client_certificate_pem", "ca_certificate_pem", "agent_port", "policy_public_key")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    AGENT_PORT_FIELD_NUMBER: _ClassVar[int]
    POLICY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    client_certificate_pem: bytes
    ca_certificate_pem: bytes
    agent_port: int
    policy_public_key: bytes
    def __init__(self, agent_id: _Optional[str] = ..., client_certificate_pem: _Optional[bytes] = ..., ca_certificate_pem: _Optional[bytes] = ..., agent_port: _Optional[int] = ..., policy_public_key: _Optional[bytes] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_der",)
    CSR_DER_FIELD_NUMBER: _ClassVar[int]
    csr_der: bytes
    def __init__(self, csr_der: _Optional[bytes] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("client_certificate_pem",)
    CLIENT_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    client_certificate_pem: bytes
    def __init__(self, client_certificate_pem: _Optional[bytes] = ...) -> None: ...

class PolicyRequest(_message.Message):
    __slots__ = ("have_revision",)
    HAVE_REVISION_FIELD_NUMBER: _ClassVar[int]
    have_revision: str
    def __init__(self, have_revision: _Optional[str] = ...) -> None: ...

class AgentPolicy(_message.Message):
    __slots__ = ("revision", "issued_at_ns", "heartbeat_interval_s", "refresh_interval_s", "document", "hash_rate")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_NS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    REFRESH_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    HASH_RATE_FIELD_NUMBER: _ClassVar[int]
    revision: str
    issued_at_ns: int
    heartbeat_interval_s: int
    refresh_interval_s: int
    document: bytes
    hash_rate: int
    def __init__(self, revision: _Optional[str] = ..., issued_at_ns: _Optional[int] = ..., heartbeat_interval_s: _Optional[int] = ..., refresh_interval_s: _Optional[int] = ..., document: _Optional[bytes] = ..., hash_rate: _Optional[int] = ...) -> None: ...

class SignedPolicy(_message.Message):
    __slots__ = ("body", "signature", "key_id")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    key_id: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[bytes] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("agent_id", "batch_seq", "batch_digest", "duplicate", "events_stored")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SEQ_FIELD_NUMBER: _ClassVar[int]
    BATCH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_STORED_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    batch_seq: int
    batch_digest: bytes
    duplicate: bool
    events_stored: int
    def __init__(self, agent_id: _Optional[str] = ..., batch_seq: _Optional[int] = ..., batch_digest: _Optional[bytes] = ..., duplicate: _Optional[bool] = ..., events_stored: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("agent_id", "sent_at_ns", "agent_version", "policy_revision", "spool_depth", "coverage_gaps", "cpu_percent", "rss_bytes")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_NS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DEPTH_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_GAPS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    sent_at_ns: int
    agent_version: str
    policy_revision: str
    spool_depth: int
    coverage_gaps: int
    cpu_percent: float
    rss_bytes: int
    def __init__(self, agent_id: _Optional[str] = ..., sent_at_ns: _Optional[int] = ..., agent_version: _Optional[str] = ..., policy_revision: _Optional[str] = ..., spool_depth: _Optional[int] = ..., coverage_gaps: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., rss_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("server_time_ns", "last_batch_seq", "last_batch_digest")
    SERVER_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    LAST_BATCH_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_BATCH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    server_time_ns: int
    last_batch_seq: int
    last_batch_digest: bytes
    def __init__(self, server_time_ns: _Optional[int] = ..., last_batch_seq: _Optional[int] = ..., last_batch_digest: _Optional[bytes] = ...) -> None: ...
