"""A real Prometheus server for the tests: loopback, a temp folder, 1 s scrapes, our rule file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serving_mfu.tools.server import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "serving_mfu_rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "serving_mfu_dashboard.json"
NAME_TOKEN = re.compile(r"serving_mfu[_:][a-zA-Z0-9_:]*")
# Grafana's variables as a query over the last minute of every model would fill them (a new one fails loudly)
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}
MISSING = ("{name} not found: `make setup` installs Debian's prometheus package where apt-get is usable "
           "as root; elsewhere put Prometheus >= 2.40 on PATH (or set SERVING_MFU_SKIP_PROMETHEUS=1 to skip)")


def require(name: str) -> str:
    """The path of `promtool` / `prometheus`; a missing one fails the test (skips only when asked to)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("SERVING_MFU_SKIP_PROMETHEUS") == "1":
            pytest.skip(f"{name} not installed and SERVING_MFU_SKIP_PROMETHEUS=1")
        pytest.fail(MISSING.format(name=name))
    return path


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the Grafana dashboard: panel targets and template-variable queries."""
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, v in node.items():
                if key in ("expr", "definition") and isinstance(v, str):
                    exprs.append(v)
                elif key == "query" and isinstance(v, str) and "serving_mfu" in v:
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(DASHBOARD.read_text()))
    return exprs


def dashboard_queries() -> list[str]:
    """The dashboard's queries as Prometheus receives them: variables filled in, `label_values()` left out."""
    return [re.sub(r"\$\w+", lambda m: GRAFANA_VARIABLES[m.group()], e)
            for e in dashboard_exprs() if not e.startswith("label_values(")]


class PrometheusServer:
    """`prometheus` scraping `targets` (host:port) every second, evaluating the serving-mfu rules every second."""

    def __init__(self, targets: list[str], folder: Path, scrape_interval_s: int = 1):
        self.binary = require("prometheus")
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(RULES, folder / "rules.yml")
        interval = f"{scrape_interval_s}s"
        config = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
                  "rule_files": ["rules.yml"],
                  "scrape_configs": [{"job_name": "vllm", "static_configs": [{"targets": targets}]}]}
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = folder / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "PrometheusServer":
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.folder / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.folder / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(self.url + "/-/ready", self.proc, self.log, timeout_s=60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; the `data` of a success, else an AssertionError with Prometheus' error."""
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        assert body["status"] == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query's vector: [{"metric": labels, "value": [t, "v"]}, ...]."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        return self.api("query", **params)["result"]

    def wait_for(self, expr: str, timeout_s: float = 60) -> list[dict]:
        """Poll until `expr` returns a non-empty vector."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            got = self.query(expr)
            if got:
                return got
            time.sleep(0.5)
        raise TimeoutError(f"{expr!r} still empty after {timeout_s:g} s; log tail:\n{self.log.read_text()[-2000:]}")

    def names(self) -> set[str]:
        """Every series name Prometheus holds (scraped and recorded)."""
        return set(self.api("label/__name__/values"))
