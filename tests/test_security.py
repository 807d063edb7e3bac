"""No local user writes through, or into, the plugin's files (DESIGN §10): each check on its own, a
writer running as an unprivileged user, and the three attacks on the shared plugin server."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from serving_mfu.files import FolderRefused, ForeignFile, folder_refusal, private_folder, read_own, write_atomic
from serving_mfu.peaks.calibrate import CALIBRATION_METHOD, cache_path, cached_calibration, save_calibration
from serving_mfu.peaks.spec import PeakSpec
from serving_mfu.runtime.aggregate import SnapshotReader
from serving_mfu.runtime.settings import Settings
from serving_mfu.runtime.trace import TraceWriter
from serving_mfu.serve.api import build_app
from tests.engine_util import prom_value
from tests.test_reliability import _tracker, _writer

NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's files needs root (CI runs as root)")


@pytest.fixture
def victim(tmp_path) -> Path:
    """An unrelated file of this user's that an attacker wants overwritten."""
    path = tmp_path / "victim.conf"
    path.write_text("precious\n")
    return path


def _foreign_folder(mode: int = 0o777) -> Path:
    """A folder in the temp dir pre-created by another user (`nobody`), as an attacker would."""
    folder = Path(tempfile.mkdtemp(prefix="serving-mfu-attack-"))
    os.chown(folder, NOBODY, NOBODY)
    os.chmod(folder, mode)
    return folder


# ------------------------------------------------------------------------------ folders
def test_a_missing_folder_is_made_private(tmp_path) -> None:
    folder = private_folder(tmp_path / "a" / "b")
    st = os.stat(folder)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()


@pytest.mark.parametrize("mode,word", [(0o770, "group"), (0o703, "others"), (0o777, "group and others")])
def test_a_folder_others_may_write_to_is_refused(tmp_path, mode: int, word: str) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, mode)
    problem = folder_refusal(folder, "snapshot folder")
    assert problem is not None and str(folder) in problem and f"writable by {word}" in problem
    assert f"mode {mode:04o}" in problem
    with pytest.raises(FolderRefused):
        private_folder(folder)
    os.chmod(folder, 0o755)  # readable by others is fine: nothing in it is secret
    assert folder_refusal(folder) is None


@ROOT_ONLY
def test_a_folder_another_user_owns_is_refused_naming_owner_mode_and_fix() -> None:
    folder = _foreign_folder()
    try:
        writer = _writer(_tracker(3), folder)
        writer.write_now()
        writer.close()
        assert writer.write_errors >= 1 and not os.listdir(folder), "nothing is written into it"
        for text in (str(folder), "nobody (uid 65534)", "mode 0777", "SERVING_MFU_DIR", f"chmod 700 {folder}"):
            assert text in writer.last_error, (text, writer.last_error)
        reader = SnapshotReader(folder)
        assert reader.totals() is None and "nobody (uid 65534)" in reader.folder_problem()
        r = TestClient(build_app(lambda: reader)).get("/metrics/mfu")
        assert r.status_code == 503 and str(folder) in r.json()["detail"] and "SERVING_MFU_DIR" in r.json()["detail"]
    finally:
        shutil.rmtree(folder)


@ROOT_ONLY
def test_a_symlinked_folder_is_refused_unless_the_link_is_ours(tmp_path) -> None:
    target = private_folder(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert folder_refusal(link) is None  # our own link to our own folder
    os.lchown(link, NOBODY, NOBODY)
    problem = folder_refusal(link)
    assert problem is not None and "symlink owned by nobody" in problem


def test_the_default_folder_is_per_user_and_prefers_the_runtime_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SERVING_MFU_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert Settings().snapshot_dir() == tmp_path / "serving-mfu"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert Settings().snapshot_dir() == Path(tempfile.gettempdir()) / f"serving-mfu-{os.geteuid()}"


def test_a_refused_folder_is_logged_once(tmp_path, caplog) -> None:
    folder = tmp_path / "open"
    folder.mkdir()
    os.chmod(folder, 0o777)
    writer = _writer(_tracker(3), folder)
    with caplog.at_level(logging.WARNING, logger="serving_mfu.runtime.publish"):
        for _ in range(5):
            writer.write_now()
    writer.close()
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR and writer.write_errors >= 5


# ------------------------------------------------------------------------------ files
def test_the_writer_never_writes_through_a_link(tmp_path, victim) -> None:
    """A link at the old fixed temporary name is never used; a link at the snapshot's own name is
    replaced by the rename, not written through.  Snapshots are 0600 and no temporary is left."""
    folder = private_folder(tmp_path / "snap")
    pid = os.getpid()
    (folder / f".engine-e1.json.{pid}.tmp").symlink_to(victim)
    (folder / "engine-e1.json").symlink_to(victim)
    writer = _writer(_tracker(4), folder)
    writer.write_now()
    writer.close()
    assert victim.read_text() == "precious\n"
    snap = folder / "engine-e1.json"
    assert not snap.is_symlink() and stat.S_IMODE(snap.stat().st_mode) == 0o600
    assert SnapshotReader(folder).totals().counters.decode_tokens == 8
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]


def test_write_atomic_replaces_a_link_and_leaves_nothing_on_failure(tmp_path, victim) -> None:
    out = tmp_path / "results.json"
    out.symlink_to(victim)
    write_atomic(out, "{}")
    assert victim.read_text() == "precious\n" and out.read_text() == "{}" and not out.is_symlink()
    with pytest.raises(TypeError):
        write_atomic(out, 3.0)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "victim.conf"]


@ROOT_ONLY
def test_the_reader_skips_links_and_other_users_files(tmp_path) -> None:
    folder = private_folder(tmp_path / "snap")
    writer = _writer(_tracker(5), folder)
    writer.write_now()
    writer.close()
    real = folder / "engine-e1.json"
    planted = folder / "engine-99999-0.json"
    shutil.copy(real, planted)
    os.chown(planted, NOBODY, NOBODY)
    (folder / "engine-88888-0.json").symlink_to(real)
    with pytest.raises(ForeignFile, match="nobody"):
        read_own(planted)
    reader = SnapshotReader(folder)
    totals = reader.totals()
    assert totals.engines == 1 and totals.counters.decode_tokens == 10  # neither copy is added
    assert totals.counters.anomalies["foreign_files"] == 2
    reader.totals()
    assert reader.totals().counters.anomalies["foreign_files"] == 2  # counted once per file, not per read


@ROOT_ONLY
def test_a_trace_is_never_written_through_a_link_or_into_another_users_file(tmp_path, victim) -> None:
    link = tmp_path / "trace.jsonl"
    link.symlink_to(victim)
    with pytest.raises(ForeignFile, match="symlink"):
        TraceWriter(link)
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text("their data\n")
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(ForeignFile, match="nobody"):
        TraceWriter(theirs)
    assert victim.read_text() == "precious\n" and theirs.read_text() == "their data\n"
    mine = tmp_path / "mine.jsonl"
    mine.write_text("an old trace, much longer than the new one\n")
    TraceWriter(mine).close()
    assert mine.read_text() == ""  # our own earlier trace is truncated, as before


@ROOT_ONLY
def test_a_planted_calibration_cache_is_not_trusted(tmp_path, caplog) -> None:
    peak = PeakSpec(device="cpu", dtype="bf16", flops_per_s=1e12, bandwidth_bytes_per_s=1e11, source="test",
                    method=CALIBRATION_METHOD)
    path = cache_path("bf16", tmp_path)
    save_calibration(peak, path)
    assert cached_calibration("bf16", tmp_path)[0].flops_per_s == 1e12
    os.chown(path, NOBODY, NOBODY)  # as if another user had planted it
    with caplog.at_level(logging.WARNING):
        assert cached_calibration("bf16", tmp_path) is None
    assert "nobody" in caplog.text
    path.unlink()
    elsewhere = tmp_path / "fake.json"
    save_calibration(peak.model_copy(update={"flops_per_s": 1e18}), elsewhere)
    path.symlink_to(elsewhere)
    assert cached_calibration("bf16", tmp_path) is None
    path.unlink()
    save_calibration(peak, path)
    os.chmod(path.parent, 0o777)
    assert cached_calibration("bf16", tmp_path) is None


# ------------------------------------------------------------------------------ as an unprivileged user
def _as_nobody(shared: str, root_owned: str, out) -> None:
    """Child process: drop to `nobody`, then publish as an engine would (everything imported first: the
    interpreter lives under /root, which nobody cannot read)."""
    from serving_mfu.runtime import aggregate, publish  # noqa: F401  (imported while still root)

    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    results = {}
    for name, folder in (("own", os.path.join(shared, "mine")), ("root_owned", root_owned),
                         ("world_writable", shared)):
        writer = _writer(_tracker(3), Path(folder))
        writer.write_now()
        writer.close()
        results[name] = (writer.write_errors, writer.last_error)
    out.send(results)


@ROOT_ONLY
def test_a_writer_running_as_nobody(tmp_path) -> None:
    """As `nobody`: it makes and uses a private folder of its own; it refuses a folder root made for
    itself (0700) and a world-writable one root made for everyone; root's reader ignores nobody's folder."""
    shared = Path(tempfile.mkdtemp(prefix="serving-mfu-nobody-"))
    os.chmod(shared, 0o1777)  # like /tmp
    root_owned = private_folder(shared / "root-only")  # root's own private folder, where nobody can see it
    try:
        warm = _writer(_tracker(1), private_folder(tmp_path / "warm"))  # the child imports nothing after setuid
        warm.close()
        ctx = multiprocessing.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_as_nobody, args=(str(shared), str(root_owned), send))
        proc.start()
        assert recv.poll(120), "the child sent nothing"
        results = recv.recv()
        proc.join(30)
        assert proc.exitcode == 0
        assert results["own"] == (0, None), results
        mine = shared / "mine"
        st = os.stat(mine)
        assert st.st_uid == NOBODY and stat.S_IMODE(st.st_mode) == 0o700
        snap = mine / "engine-e1.json"
        assert snap.stat().st_uid == NOBODY and stat.S_IMODE(snap.stat().st_mode) == 0o600
        errors, last = results["root_owned"]
        assert errors >= 1 and str(root_owned) in last and "root (uid 0)" in last
        errors, last = results["world_writable"]
        assert errors >= 1 and "mode 1777" in last and "root (uid 0)" in last
        assert not list(root_owned.iterdir()) and sorted(p.name for p in shared.iterdir()) == ["mine", "root-only"]
        # root reading nobody's folder: refused (not root's), so nothing nobody wrote reaches root's totals
        assert SnapshotReader(mine).totals() is None
    finally:
        shutil.rmtree(shared)


# ------------------------------------------------------------------------------ the real engine
def _report(base: str) -> dict:
    fresh = {"min_as_of": f"{time.time():.6f}", "timeout": "10"}
    r = httpx.get(base + "/metrics/mfu", params=fresh, timeout=20)
    assert r.status_code == 200, r.text
    return r.json()


def _complete(base: str, model: str, prompt: str) -> None:
    r = httpx.post(base + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text


@pytest.mark.engine
@ROOT_ONLY
def test_the_three_attacks_fail_on_the_plugin_server(plugin_server, victim) -> None:
    """On the shared plugin server (root, an explicit SERVING_MFU_DIR): (1) its folder handed to another
    user with mode 0777 is refused — the endpoint's 503 names it, its owner, mode and the fix, and
    completions go on; (2) a symlink at the writer's old temporary name, and (3) a planted engine file
    (another user's, a live pid, the API server as parent, counters ×1000) change nothing: the victim
    is intact and the prompt tokens still equal vLLM's."""
    base, model, folder = plugin_server["base"], plugin_server["model"], plugin_server["publish"]
    ours = sorted(folder.glob("engine-*.json"))
    assert ours, "the engine publishes"
    engine_file = ours[0]
    engine_pid = int(engine_file.name.split("-")[1])
    api_pid = json.loads(engine_file.read_bytes())["ppid"]  # the engine's parent: the API server
    link = folder / f".{engine_file.name}.{engine_pid}.tmp"
    planted = folder / "engine-99999-0.json"
    try:
        # (1) the folder, pre-created by another user with mode 0777 (here: handed over while running)
        os.chown(folder, NOBODY, NOBODY)
        os.chmod(folder, 0o777)
        _complete(base, model, "the engine and the folder")
        r = httpx.get(base + "/metrics/mfu", timeout=10)
        assert r.status_code == 503, r.text
        detail = r.text  # vLLM's server wraps HTTP errors in its own {"error": {"message": ...}}
        for text in (str(folder), "nobody (uid 65534)", "mode 0777", "SERVING_MFU_DIR", "chmod 700"):
            assert text in detail, (text, detail)
        os.chown(folder, os.geteuid(), os.getegid())
        os.chmod(folder, 0o700)

        # (2) a symlink at the temporary name the writer used to write through
        link.symlink_to(victim)
        # (3) another user's engine file: alive (pid 1), the API server as parent, fresh, counters ×1000
        forged = json.loads(engine_file.read_bytes())
        forged.update(engine_id="99999-0", pid=1, ppid=api_pid, updated_at=time.time() + 60,
                      as_of=time.time() + 60)
        forged["counters"] = _times(forged["counters"], 1000)
        planted.write_text(json.dumps(forged))
        os.chown(planted, NOBODY, NOBODY)

        _complete(base, model, "the engine engine and the planted file")
        time.sleep(1.2)  # at least two more publishes
        report = _report(base)
        prom = httpx.get(base + "/metrics", timeout=10).text
        assert victim.read_text() == "precious\n"
        assert report["prefill"]["tokens"] + report["prefix_cache"]["hit_tokens"] == \
            prom_value(prom, "vllm:prompt_tokens_total")
        assert report["anomalies"]["counts"].get("foreign_files") == 1
    finally:
        os.chown(folder, os.geteuid(), os.getegid())
        os.chmod(folder, 0o700)
        link.unlink(missing_ok=True)
        planted.unlink(missing_ok=True)


def _times(counters, k: int):
    if isinstance(counters, bool):
        return counters
    if isinstance(counters, (int, float)):
        return counters * k
    if isinstance(counters, dict):
        return {key: _times(v, k) for key, v in counters.items()}
    if isinstance(counters, list):
        return [_times(v, k) for v in counters]
    return counters
