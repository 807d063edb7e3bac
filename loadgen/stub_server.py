"""Run the stub server: in a background thread (tests) or a subprocess (bench-client), on a free port."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import uvicorn

from loadgen.stub import StubConfig, build_app


def uvicorn_config(app, log_level: str = "warning") -> uvicorn.Config:
    """Fast settings: httptools and uvloop where installed ("auto"), no access log, 1 s graceful shutdown."""
    return uvicorn.Config(app, loop="auto", http="auto", log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=1, lifespan="off")


def healthy(url: str) -> bool:
    """Whether GET url/health answers 200 within 1 s (no proxy variables: the stub is local)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "/health", timeout=1) as r:
            return r.status == 200
    except (OSError, http.client.HTTPException):  # refused while starting, an HTTP error, a torn answer
        return False


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class StubThread:
    """The stub in a daemon thread with its own event loop; a context manager with `.url`."""

    def __init__(self, config: StubConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "critical"):
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.app = build_app(config)
        self.server = uvicorn.Server(uvicorn_config(self.app, log_level))
        self.thread = threading.Thread(target=self.server.run, args=([self.sock],),
                                       name="mfu-loadgen-stub", daemon=True)

    def __enter__(self) -> "StubThread":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the stub server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()


class StubProcess:
    """The stub as `python -m loadgen stub` in a child process: it gets its own core and event loop."""

    def __init__(self, config: StubConfig | None = None, host: str = "127.0.0.1"):
        with bind(host) as s:
            self.port = s.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.config = config or StubConfig()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "StubProcess":
        cmd = [sys.executable, "-m", "loadgen", "stub", "--host", "127.0.0.1", "--port", str(self.port),
               "--config-json", self.config.model_dump_json(), "--log-level", "error"]
        self.proc = subprocess.Popen(cmd, env=os.environ.copy())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the stub server exited with {self.proc.returncode}")
            if healthy(self.url):
                return self
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("the stub server did not start within 30 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve(config: StubConfig, host: str, port: int, log_level: str = "warning") -> None:
    """Run the stub in the foreground until interrupted."""
    uvicorn.Server(uvicorn_config(build_app(config), log_level)).run(sockets=[bind(host, port)])
