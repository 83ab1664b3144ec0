"""The committed generated code is exactly what grpcio-tools (and mypy-protobuf) generate."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    from grpc_tools import protoc

    plugin = shutil.which("protoc-gen-mypy_grpc", path=str(Path(sys.executable).parent))
    if plugin is None:
        pytest.fail("protoc-gen-mypy_grpc (mypy-protobuf) is not installed next to this Python")
    sources = sorted(str(p.relative_to(PROTO)) for p in PROTO.glob("exfilwatch/v1/*.proto"))
    assert sources, "no .proto files found"
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO}",
            f"-I{include}",
            f"--plugin=protoc-gen-mypy_grpc={plugin}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            *[str(PROTO / s) for s in sources],
        ]
    )
    assert rc == 0
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(PROTO) for p in PROTO.rglob("*") if p.is_file() and p.name.endswith(GENERATED)
    )
    assert fresh == committed, "generated file set differs: run `make proto` and commit"
    stale = [str(f) for f in fresh if (tmp_path / f).read_bytes() != (PROTO / f).read_bytes()]
    assert not stale, f"stale generated code (run `make proto` and commit): {stale}"


def test_contract_imports_as_exfilwatch_v1() -> None:
    from exfilwatch.v1 import collector_pb2, collector_pb2_grpc, events_pb2

    assert events_pb2.EventBatch.DESCRIPTOR.full_name == "exfilwatch.v1.EventBatch"
    methods = collector_pb2.DESCRIPTOR.services_by_name["Collector"].methods_by_name
    assert set(methods) == {
        "Enroll",
        "UploadBatch",
        "Heartbeat",
        "RenewCertificate",
        "GetPolicy",
    }
    assert hasattr(collector_pb2_grpc, "CollectorStub")
