"""notebooks/mfu_analysis.ipynb runs top to bottom (nbclient) and draws every figure.

The data is the suite's own: the session's `serving-mfu demo --short` run (`demo_run`), passed
to the notebook's kernel through `MFU_RESULTS_DIR`.  Each figure cell is tagged
`figure:<name>` and must leave exactly one image/png output.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "mfu_analysis.ipynb"
FIGURES = {"utilization_over_time", "mfu_vs_load", "decode_mfu_vs_acceptance", "wasted_saved", "waterfall",
           "roofline", "estimator_errors"}


def _execute(monkeypatch, results_dir: str, timeout: int = 240):
    monkeypatch.setenv("MFU_RESULTS_DIR", results_dir)  # the kernel inherits this environment
    # this interpreter's kernelspec first (not a user-level "python3" pointing at another Python)
    monkeypatch.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))
    monkeypatch.delenv("MFU_TRACE_PATH", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    return nb


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def test_notebook_is_clean_and_parameterised() -> None:
    """Committed without outputs; paths are parameters at the top, overridable by environment."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in _tags(code[0])
    assert 'RESULTS_DIR = os.environ.get("MFU_RESULTS_DIR", "../demo-results")' in code[0].source
    tagged = {t.split(":", 1)[1] for c in code for t in _tags(c) if t.startswith("figure:")}
    assert tagged == FIGURES


@pytest.mark.engine
def test_notebook_runs_on_the_demo_output(demo_run, monkeypatch) -> None:
    out_dir, _ = demo_run
    t0 = time.monotonic()
    nb = _execute(monkeypatch, str(out_dir))
    elapsed = time.monotonic() - t0
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    drawn = {}
    for c in code:
        for tag in _tags(c):
            if tag.startswith("figure:"):
                pngs = [o for o in c.outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
                drawn[tag.split(":", 1)[1]] = len(pngs)
    assert drawn == {name: 1 for name in FIGURES}, drawn
    # The run's data was read: the summary names the demo's scenarios and the comparison table was drawn.
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for c in code for o in c.outputs)
    for name in ("prefill-heavy", "decode-heavy", "mixed", "whole trace", "deepseek-v3"):
        assert name in text
    assert str(Path(out_dir).resolve()) in text
    assert elapsed < 120, f"notebook took {elapsed:.0f} s"


def test_notebook_without_results_says_how_to_make_them(monkeypatch, tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(nbclient.exceptions.CellExecutionError) as exc:
        _execute(monkeypatch, str(missing), timeout=120)
    assert "MissingResults" in str(exc.value) and "make demo" in str(exc.value)
