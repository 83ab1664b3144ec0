from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_COPY: _ClassVar[Action]
    ACTION_MOVE: _ClassVar[Action]
    ACTION_READ: _ClassVar[Action]
    ACTION_WRITE: _ClassVar[Action]
    ACTION_DELETE: _ClassVar[Action]
    ACTION_RENAME: _ClassVar[Action]
    ACTION_COVERAGE_GAP: _ClassVar[Action]
    ACTION_AGENT_START: _ClassVar[Action]
    ACTION_AGENT_STOP: _ClassVar[Action]

class DestinationClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DESTINATION_CLASS_UNSPECIFIED: _ClassVar[DestinationClass]
    DESTINATION_CLASS_REMOVABLE: _ClassVar[DestinationClass]
    DESTINATION_CLASS_NETWORK_SHARE: _ClassVar[DestinationClass]
    DESTINATION_CLASS_CLOUD_SYNC: _ClassVar[DestinationClass]
    DESTINATION_CLASS_LOCAL: _ClassVar[DestinationClass]

class DetectionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DETECTION_METHOD_UNSPECIFIED: _ClassVar[DetectionMethod]
    DETECTION_METHOD_EXACT_HASH: _ClassVar[DetectionMethod]
    DETECTION_METHOD_ARCHIVE_MEMBER: _ClassVar[DetectionMethod]
    DETECTION_METHOD_LABEL_IN_CONTENT: _ClassVar[DetectionMethod]
    DETECTION_METHOD_SAME_PROCESS: _ClassVar[DetectionMethod]
    DETECTION_METHOD_PROBABLE: _ClassVar[DetectionMethod]

class AttributionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTRIBUTION_METHOD_UNSPECIFIED: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_UNATTRIBUTED: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_FANOTIFY: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_PROCESS_CACHE: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_PROC_SCAN: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_FILE_OWNER: _ClassVar[AttributionMethod]
ACTION_UNSPECIFIED: Action
ACTION_COPY: Action
ACTION_MOVE: Action
ACTION_READ: Action
ACTION_WRITE: Action
ACTION_DELETE: Action
ACTION_RENAME: Action
ACTION_COVERAGE_GAP: Action
ACTION_AGENT_START: Action
ACTION_AGENT_STOP: Action
DESTINATION_CLASS_UNSPECIFIED: DestinationClass
DESTINATION_CLASS_REMOVABLE: DestinationClass
DESTINATION_CLASS_NETWORK_SHARE: DestinationClass
DESTINATION_CLASS_CLOUD_SYNC: DestinationClass
DESTINATION_CLASS_LOCAL: DestinationClass
DETECTION_METHOD_UNSPECIFIED: DetectionMethod
DETECTION_METHOD_EXACT_HASH: DetectionMethod
DETECTION_METHOD_ARCHIVE_MEMBER: DetectionMethod
DETECTION_METHOD_LABEL_IN_CONTENT: DetectionMethod
DETECTION_METHOD_SAME_PROCESS: DetectionMethod
DETECTION_METHOD_PROBABLE: DetectionMethod
ATTRIBUTION_METHOD_UNSPECIFIED: AttributionMethod
ATTRIBUTION_METHOD_UNATTRIBUTED: AttributionMethod
ATTRIBUTION_METHOD_FANOTIFY: AttributionMethod
ATTRIBUTION_METHOD_PROCESS_CACHE: AttributionMethod
ATTRIBUTION_METHOD_PROC_SCAN: AttributionMethod
ATTRIBUTION_METHOD_FILE_OWNER: AttributionMethod

class FileRef(_message.Message):
    __slots__ = ("path", "size", "sha256", "device", "inode", "mtime_ns")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    path: bytes
    size: int
    sha256: str
    device: int
    inode: int
    mtime_ns: int
    def __init__(self, path: _Optional[bytes] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., device: _Optional[int] = ..., inode: _Optional[int] = ..., mtime_ns: _Optional[int] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("vendor", "model", "serial", "fs_uuid", "fs_type", "mount_point", "remote")
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    FS_UUID_FIELD_NUMBER: _ClassVar[int]
    FS_TYPE_FIELD_NUMBER: _ClassVar[int]
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    vendor: str
    model: str
    serial: str
    fs_uuid: str
    fs_type: str
    mount_point: bytes
    remote: str
    def __init__(self, vendor: _Optional[str] = ..., model: _Optional[str] = ..., serial: _Optional[str] = ..., fs_uuid: _Optional[str] = ..., fs_type: _Optional[str] = ..., mount_point: _Optional[bytes] = ..., remote: _Optional[str] = ...) -> None: ...

class ProcessInfo(_message.Message):
    __slots__ = ("pid", "start_time_ns", "exe", "cmdline", "ppid_chain", "name")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    EXE_FIELD_NUMBER: _ClassVar[int]
    CMDLINE_FIELD_NUMBER: _ClassVar[int]
    PPID_CHAIN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start_time_ns: int
    exe: bytes
    cmdline: _containers.RepeatedScalarFieldContainer[bytes]
    ppid_chain: _containers.RepeatedScalarFieldContainer[int]
    name: str
    def __init__(self, pid: _Optional[int] = ..., start_time_ns: _Optional[int] = ..., exe: _Optional[bytes] = ..., cmdline: _Optional[_Iterable[bytes]] = ..., ppid_chain: _Optional[_Iterable[int]] = ..., name: _Optional[str] = ...) -> None: ...

class UserInfo(_message.Message):
    __slots__ = ("login", "effective", "uid")
    LOGIN_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    login: str
    effective: str
    uid: int
    def __init__(self, login: _Optional[str] = ..., effective: _Optional[str] = ..., uid: _Optional[int] = ...) -> None: ...

class CoverageGap(_message.Message):
    __slots__ = ("reason", "count")
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    reason: str
    count: int
    def __init__(self, reason: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "seq", "observed_at_ns", "action", "source", "label", "label_source", "destination", "destination_class", "device", "process", "user", "host", "detection", "attribution", "gap", "agent_version", "count", "archive_member")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_NS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_CLASS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    DETECTION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    ARCHIVE_MEMBER_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    seq: int
    observed_at_ns: int
    action: Action
    source: FileRef
    label: str
    label_source: str
    destination: FileRef
    destination_class: DestinationClass
    device: Device
    process: ProcessInfo
    user: UserInfo
    host: str
    detection: DetectionMethod
    attribution: AttributionMethod
    gap: CoverageGap
    agent_version: str
    count: int
    archive_member: bytes
    def __init__(self, event_id: _Optional[str] = ..., seq: _Optional[int] = ..., observed_at_ns: _Optional[int] = ..., action: _Optional[_Union[Action, str]] = ..., source: _Optional[_Union[FileRef, _Mapping]] = ..., label: _Optional[str] = ..., label_source: _Optional[str] = ..., destination: _Optional[_Union[FileRef, _Mapping]] = ..., destination_class: _Optional[_Union[DestinationClass, str]] = ..., device: _Optional[_Union[Device, _Mapping]] = ..., process: _Optional[_Union[ProcessInfo, _Mapping]] = ..., user: _Optional[_Union[UserInfo, _Mapping]] = ..., host: _Optional[str] = ..., detection: _Optional[_Union[DetectionMethod, str]] = ..., attribution: _Optional[_Union[AttributionMethod, str]] = ..., gap: _Optional[_Union[CoverageGap, _Mapping]] = ..., agent_version: _Optional[str] = ..., count: _Optional[int] = ..., archive_member: _Optional[bytes] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("agent_id", "batch_seq", "prev_batch_digest", "sealed_at_ns", "events")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SEQ_FIELD_NUMBER: _ClassVar[int]
    PREV_BATCH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SEALED_AT_NS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    batch_seq: int
    prev_batch_digest: bytes
    sealed_at_ns: int
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, agent_id: _Optional[str] = ..., batch_seq: _Optional[int] = ..., prev_batch_digest: _Optional[bytes] = ..., sealed_at_ns: _Optional[int] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class SignedBatch(_message.Message):
    __slots__ = ("body", "signature", "key_id")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    key_id: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[bytes] = ...) -> None: ...
