"""Runs the console: uvicorn serving the Starlette app over HTTPS, in a thread of `serve`.

    exfilwatch-collector serve -> gRPC server (its own thread pool)
                               -> **ConsoleServer** (one thread, one asyncio loop)

The gRPC server is the synchronous, thread-pool kind, so the console's event loop lives
alone in its thread and shares nothing with it but the store (thread-safe). The socket
is bound in the constructor, so port 0 yields the real port before anything starts.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from collector.errors import ConfigError
from collector.policy import Policy
from collector.server import split_hostport
from collector.store import SqliteStore

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8443"
START_TIMEOUT_S = 15.0


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling us when it listens (or gave up)."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self._ready.set()


class ConsoleServer:
    """The console's HTTPS listener: bound at construction, `start()`ed, `stop()`ped."""

    def __init__(
        self,
        app: Starlette,
        *,
        listen: str,
        certfile: Path,
        keyfile: Path,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self._on_stop = on_stop
        host, port = split_hostport(listen, "--console-listen")
        for path in (certfile, keyfile):
            if not path.is_file():
                raise ConfigError(f"console TLS file {path} does not exist")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise ConfigError(f"--console-listen: cannot resolve {listen}: {e}") from e
        sock = socket.socket(infos[0][0], socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise ConfigError(
                f"--console-listen: cannot listen on {listen}: {e}; "
                "pick another with --console-listen HOST:PORT, or serve --no-console"
            ) from e
        self._sock = sock
        self.host = host
        self.port: int = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            ssl_certfile=str(certfile),
            ssl_keyfile=str(keyfile),
            log_config=None,  # the entry point configures logging (collector.cli)
            access_log=False,
            lifespan="off",
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=5,
        )
        try:
            config.load()  # reads the certificate and key now, so errors surface here
        except (OSError, ValueError) as e:
            sock.close()
            raise ConfigError(f"console TLS: cannot load {certfile} / {keyfile}: {e}") from e
        self._ready = threading.Event()
        self._server = _Uvicorn(config, self._ready)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}/"

    def start(self) -> None:
        """Serve in a thread; returns once the console listens (ConfigError if it cannot)."""
        self._thread = threading.Thread(target=self._run, name="console", daemon=False)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S) or not self._server.started:
            self.stop()
            raise ConfigError(f"the console did not start on {self.url}; see the log")
        logger.info("console listening on %s", self.url)

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        finally:
            self._ready.set()

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to 5 s), join the thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sock.close()
        if self._on_stop is not None:
            self._on_stop()
            self._on_stop = None


def open_console(
    store: SqliteStore,
    policy: Policy,
    db_path: Path,
    *,
    listen: str,
    certfile: Path,
    keyfile: Path,
) -> ConsoleServer:
    """The console of a running collector, bound (not started): what `serve` calls."""
    from collector.web.app import build_console, create_app  # the app pulls in the views

    console = build_console(store, policy, db_path)
    try:
        return ConsoleServer(
            create_app(console), listen=listen, certfile=certfile, keyfile=keyfile,
            on_stop=console.reader.close,
        )  # fmt: skip
    except BaseException:
        console.reader.close()
        raise
