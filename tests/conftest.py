"""Shared fixtures: the short demo runs once per session; its output feeds the demo and notebook tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`serving-mfu demo --short` on the CPU engine: its output folder and the finished process."""
    out = tmp_path_factory.mktemp("demo") / "demo-results"
    import os

    # a fresh machine: no calibration cached yet, no peak setting (the demo calibrates once and caches it)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_MFU_")}
    env["SERVING_MFU_CACHE_DIR"] = str(tmp_path_factory.mktemp("demo-cache"))
    proc = subprocess.run([str(Path(sys.executable).with_name("serving-mfu")), "demo", "--short", "--out-dir",
                           str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc
