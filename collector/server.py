"""Builds the gRPC server: an agent port (mutual TLS) and an enrolment port (server TLS).

`create_server` binds and returns the ports; the caller starts and stops it,
so tests can bind port 0.
"""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass

import grpc

from collector import pki
from collector.errors import ConfigError
from collector.procsetup import serving_gc
from collector.rpc import Handlers

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""A batch closes at 1 MiB; 8 MiB leaves room and still bounds what a peer can make us buffer."""

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Agents ping every 60 s (agent.shipper); allow it, and drop idle or old connections
    # so an L4 load balancer can rebalance agents (FIELD-NOTES, gRPC keepalive).
    ("grpc.keepalive_time_ms", 120_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.max_connection_idle_ms", 15 * 60_000),
    ("grpc.max_connection_age_ms", 60 * 60_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
    ("grpc.so_reuseport", 0),
)


@dataclass(frozen=True)
class Bound:
    server: grpc.Server
    agent_port: int
    enroll_port: int


RPC_THREADS = 64
"""Calls served at once. An upload holds its thread while it waits in the ingest process for
its group commit (collector.ingestproc), so this bounds the batches one commit can take;
more calls queue in gRPC (up to 16 times as many)."""


def split_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def create_server(
    handlers: Handlers,
    authority: pki.Authority,
    *,
    listen: str,
    enroll_listen: str,
    workers: int = RPC_THREADS,
) -> Bound:
    """Bind both ports; raises ConfigError when an address cannot be bound.

    Also sets this process's GC thresholds (procsetup.serving_gc): it serves from now on.
    """
    serving_gc()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=workers * 16,
    )
    server.add_generic_rpc_handlers((handlers.generic_handler(),))
    pair = [(authority.server_key_pem, authority.server_chain_pem)]
    mtls = grpc.ssl_server_credentials(
        pair, root_certificates=authority.ca_pem, require_client_auth=True
    )
    tls = grpc.ssl_server_credentials(pair)
    ports = []
    for address, creds, what in (
        (listen, mtls, "--listen"),
        (enroll_listen, tls, "--enroll-listen"),
    ):
        host, port = split_hostport(address, what)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_secure_port(target, creds)
        except RuntimeError as e:
            raise ConfigError(f"{what}: cannot listen on {address}: {e}") from e
        if bound == 0:
            raise ConfigError(f"{what}: cannot listen on {address} (in use or not permitted)")
        ports.append(bound)
    return Bound(server, ports[0], ports[1])
