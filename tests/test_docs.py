"""The docs show what the code computes: the README is a short front door, the docs' generated pages
name every series and report field, the worked example and settings table are the code's own, and
every "DESIGN §N" in the code points to a section of docs/design.md."""

from __future__ import annotations

import re
from pathlib import Path

from serving_mfu.tools.docs_pages import PAGES, report_field_paths, series
from serving_mfu.tools.worked_example import worked_example_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PACKAGES = ("serving_mfu", "scheduler_hooks", "loadgen")


def _between(text: str, name: str) -> str:
    m = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert m, f"the page lacks the {name} block"
    return m.group(1)


def _site_text() -> str:
    """Every hand-written page and every generated one, as the build writes them."""
    hand = "\n".join(p.read_text() for p in sorted(DOCS.rglob("*.md")))
    return hand + "\n".join(make() for make in PAGES.values())


def test_readme_opens_with_the_two_commands_and_stays_short() -> None:
    text = README.read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert len(text.splitlines()) <= 250, len(text.splitlines())
    for link in re.findall(r"\]\((docs/[^)#]+)", text):  # every link into the docs resolves
        assert (ROOT / link).exists(), link


def test_worked_example_matches_the_code() -> None:
    assert _between((DOCS / "estimators.md").read_text(), "worked-example").strip() == \
        worked_example_markdown().strip()


def test_settings_table_is_the_settings_object() -> None:
    """Every SERVING_MFU_* variable the settings table names is a Settings field, and back."""
    from serving_mfu.runtime.settings import Settings

    text = (DOCS / "plugin.md").read_text()
    table = text[text.index("| setting (environment) | effect |"):]
    table = table[:table.index("\n\n")]
    documented = set(re.findall(r"`(SERVING_MFU_[A-Z_]+)`", table))
    assert documented == {Settings.env_name(name) for name in Settings.model_fields}


def test_every_prometheus_series_and_rule_is_in_the_docs() -> None:
    text = _site_text()
    names = [name for name, *_ in series()]
    assert len(names) > 40
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, missing
    rules = re.findall(r"record: (\S+)", (ROOT / "deploy" / "prometheus" / "serving_mfu_rules.yml").read_text())
    assert rules and not [r for r in rules if f"`{r}`" not in text]


def test_every_report_field_is_in_the_docs() -> None:
    text = _site_text()
    paths = report_field_paths()
    assert {"prefill.mfu", "decode.hfu", "overall.wall_mfu", "peak.credible", "anomalies.counts"} <= set(paths)
    missing = [p for p in paths if f"`{p}`" not in text]
    assert not missing, missing


def test_every_design_reference_resolves() -> None:
    """Each "DESIGN §N" in the code names a section `## N.` of docs/design.md."""
    sections = set(re.findall(r"^## (\d+)\. ", (DOCS / "design.md").read_text(), re.M))
    cited = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for ref in re.findall(r"DESIGN (§\d+(?:(?:, | and |–|-)§\d+)*)", path.read_text()):
                for lo, hi in re.findall(r"§(\d+)(?:[–-]§(\d+))?", ref):  # a range cites every section in it
                    for n in range(int(lo), int(hi or lo) + 1):
                        cited.setdefault(str(n), str(path.relative_to(ROOT)))
    assert cited, "no DESIGN reference found"
    unresolved = {n: where for n, where in cited.items() if n not in sections}
    assert not unresolved, unresolved
