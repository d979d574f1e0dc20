"""Starting and stopping the real servers that tests use (MLflow, moto's S3), on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
MLFLOW = str(BIN / "mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, and its children, by its process group: TERM, then KILL."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    # mlflow runs helpers (uvicorn, gunicorn) by name: they live beside this interpreter
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


@contextlib.contextmanager
def start_mlflow_server(root: Path, artifacts: str | None = None, env: dict | None = None):
    """A real `mlflow server` on a free loopback port, SQLite backend; artifacts proxied to ``artifacts``."""
    port = free_port()
    proc = start(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", artifacts or str(root / "artifacts")],
        root / "server.log", env=env,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc, root / "server.log")
        yield {"uri": f"http://127.0.0.1:{port}", "artifacts": root / "artifacts", "proc": proc}
    finally:
        stop(proc)


@contextlib.contextmanager
def start_moto(root: Path):
    """moto's S3-compatible server on a free loopback port; yields the environment that points at it."""
    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    proc = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], root / "moto.log", env=env)
    try:
        wait_for(f"http://127.0.0.1:{port}/moto-api/", proc, root / "moto.log")
        yield env
    finally:
        stop(proc)


def chromium() -> str:
    """Debian's chromium (or another Chromium) for headless page checks; the test is skipped without one."""
    import pytest

    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium here (CI installs it: scripts/setup-deploy-tools.sh)")


class TcpProxy:
    """A TCP proxy on a free loopback port to ``127.0.0.1:target`` that a test cuts and restores.

    ``cut()`` closes the listening socket and every open connection, as an endpoint that went down
    does (new connections are refused, requests in flight are reset); ``restore()`` listens again on
    the same port. Plain sockets and one thread per direction: enough for a test's few connections.
    """

    def __init__(self, target: int) -> None:
        import threading

        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: set = set()
        self._listener = None
        self.cuts = 0
        self.stalled = False
        self.restore()

    def restore(self) -> None:
        import threading

        self.stalled = False
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stall(self) -> None:
        """Drop the open connections and hold every new one open without an answer (an endpoint that hangs)."""
        self.cut()
        self.restore()
        self.stalled = True

    def cut(self) -> None:
        self.stalled = False
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
            self.cuts += 1
        for s in ([listener] if listener else []) + list(sockets):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut: the listener is closed
                return
            if self.stalled:  # accepted, and never answered
                with self._lock:
                    self._sockets.add(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut()
