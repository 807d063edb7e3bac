"""The CLI contracts outside tools rely on, and its handling of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving_mfu.cost.records import IterationRecord, Slice, encode_record
from serving_mfu.runtime.trace import TraceHeader, TraceWriter
from serving_mfu.tools.public_configs import PUBLIC_CONFIGS
from tests.test_accounting import LLAMA

EXE = str(Path(sys.executable).with_name("serving-mfu"))


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture()
def llama70b(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PUBLIC_CONFIGS["llama-3-70b"]))
    return path


def test_flops_contract_decode(llama70b: Path) -> None:
    out = json.loads(cli("flops", str(llama70b), "--new-tokens", "1", "--context-len", "4096", "--json").stdout)
    assert set(out) >= {"total", "breakdown"}
    b = out["breakdown"]
    assert out["total"] == sum(b.values())
    # Written out by hand from the Llama-3-70B config: 80 layers, h=8192, 64 heads, 8 KV heads of 128.
    layers, h, heads, kv, d, inter, vocab = 80, 8192, 64, 8, 128, 28672, 128256
    assert b["q_proj"] == 2 * h * heads * d * layers
    assert b["k_proj"] == b["v_proj"] == 2 * h * kv * d * layers
    assert b["o_proj"] == 2 * heads * d * h * layers
    assert b["mlp"] == 2 * 3 * h * inter * layers
    assert b["attention_scores"] == 2 * heads * (d + d) * 4096 * layers  # one query, 4096 keys
    assert b["lm_head"] == 2 * h * vocab


def test_flops_contract_prefill_and_folder(llama70b: Path) -> None:
    q = 4096
    out = json.loads(cli("flops", str(llama70b.parent), "--new-tokens", str(q), "--context-len", str(q),
                         "--logits-tokens", "1", "--json").stdout)
    layers, heads, d = 80, 64, 128
    assert out["breakdown"]["attention_scores"] == 2 * heads * 2 * d * layers * q * (q + 1) // 2
    # a chunk after 1000 cached positions: every new position also sees the 1000
    out2 = json.loads(cli("flops", str(llama70b), "--new-tokens", "10", "--context-len", "1010", "--json").stdout)
    assert out2["breakdown"]["attention_scores"] == 2 * heads * 2 * d * layers * (10 * 1000 + 10 * 11 // 2)


def test_flops_per_device_under_tp(llama70b: Path) -> None:
    out = json.loads(cli("flops", str(llama70b), "--new-tokens", "1", "--context-len", "10", "--tp", "16",
                         "--json").stdout)
    per = out["per_device"]["breakdown"]
    # 8 KV heads on 16 ranks: each rank holds a copy of one KV head, so K/V work doubles
    assert per["k_proj"] == pytest.approx(out["breakdown"]["k_proj"] * 2 / 16)
    assert per["q_proj"] == pytest.approx(out["breakdown"]["q_proj"] / 16)


def test_flops_bad_input(tmp_path: Path) -> None:
    cfg = dict(LLAMA)
    del cfg["num_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    proc = cli("flops", str(tmp_path), "--new-tokens", "1", "--context-len", "5", "--json", check=False)
    assert proc.returncode == 2
    assert "num_attention_heads" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("flops", str(tmp_path / "nope.json"), "--new-tokens", "1", "--context-len", "5", check=False)
    assert proc.returncode == 2 and "no config found" in proc.stderr
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    proc = cli("flops", str(tmp_path), "--new-tokens", "9", "--context-len", "5", check=False)
    assert proc.returncode == 2 and "new_tokens" in proc.stderr


def test_peak_contract() -> None:
    out = json.loads(cli("peak", "--device", "h100-sxm", "--dtype", "bf16", "--json").stdout)
    assert set(out) == {"flops_per_s", "bandwidth_bytes_per_s", "source"}
    assert out["flops_per_s"] == pytest.approx(989.4e12, rel=1e-3)  # H100 SXM datasheet, dense BF16
    assert out["bandwidth_bytes_per_s"] == pytest.approx(3.35e12, rel=1e-3)
    assert "http" in out["source"]
    proc = cli("peak", "--device", "tpu-v9", "--dtype", "bf16", "--json", check=False)
    assert proc.returncode == 2
    assert "h100-sxm" in proc.stderr and "mi300x" in proc.stderr  # lists the known devices


def _trace(path: Path, bad_line: str | None = None) -> list[IterationRecord]:
    records = []
    for step in range(6):
        slices = [Slice(req_id="a", new_tokens=1, computed_before=20 + step, prompt_len=20, hwm=20 + step)]
        if step == 0:
            slices.append(Slice(req_id="b", new_tokens=30, computed_before=0, prompt_len=30))
        records.append(IterationRecord(step=step, t_sched_s=step * 0.1, t_end_s=step * 0.1 + 0.05, slices=slices))
    header = TraceHeader(hf_config=LLAMA, devices=1)
    with TraceWriter(path, header) as w:
        for i, r in enumerate(records):
            w.write(r)
            if i == 1 and bad_line is not None:
                w._fh.write(bad_line + "\n")
    return records


def test_replay_reports_and_skips_malformed_lines(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    _trace(trace, bad_line='{"step": 7, "t_sched_s": "soon"}')
    proc = cli("replay", str(trace), "--peak-flops", "1e12", "--peak-bandwidth", "1e11", "--json")
    report = json.loads(proc.stdout)
    assert "line 4" in proc.stderr  # header is line 1, records 2-3, the bad line 4
    assert report["decode"]["tokens"] == 6 and report["prefill"]["tokens"] == 30
    assert report["anomalies"]["counts"]["malformed_trace_lines"] == 1
    assert report["peak"]["source"] == "override"
    assert 0 < report["decode"]["mfu"] <= report["decode"]["hfu"] <= 1
    table = cli("replay", str(trace), "--peak-flops", "1e12", "--peak-bandwidth", "1e11").stdout
    assert "prefill" in table and "decode" in table


def test_replay_without_config_is_a_clear_error(tmp_path: Path) -> None:
    trace = tmp_path / "bare.jsonl"
    trace.write_text(encode_record(IterationRecord(step=0, t_sched_s=0, t_end_s=1, slices=[])).decode() + "\n")
    proc = cli("replay", str(trace), check=False)
    assert proc.returncode == 2 and "--config" in proc.stderr
    proc = cli("replay", str(tmp_path / "missing.jsonl"), check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_bench_accounting_prints_numbers() -> None:
    rows = json.loads(cli("bench-accounting", "--batches", "1", "16", "--repeats", "5", "--json").stdout)
    assert {r["slices"] for r in rows} == {1, 16}
    assert all(r["us_per_iteration"] > 0 for r in rows)
