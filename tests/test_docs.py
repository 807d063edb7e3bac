"""The README shows what the code computes: its worked example is the code's own output."""

from __future__ import annotations

import re
from pathlib import Path

from serving_mfu.tools.worked_example import worked_example_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def _between(text: str, name: str) -> str:
    m = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert m, f"README lacks the {name} block"
    return m.group(1)


def test_readme_opens_with_the_two_commands() -> None:
    text = README.read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_worked_example_matches_the_code() -> None:
    assert _between(README.read_text(), "worked-example").strip() == worked_example_markdown().strip()


def test_readme_settings_table_is_the_settings_object() -> None:
    """Every SERVING_MFU_* variable the README's settings table names is a Settings field, and back."""
    from serving_mfu.runtime.settings import Settings

    text = README.read_text()
    table = text[text.index("| setting (environment) | effect |"):]
    table = table[:table.index("\n\n")]
    documented = set(re.findall(r"`(SERVING_MFU_[A-Z_]+)`", table))
    assert documented == {Settings.env_name(name) for name in Settings.model_fields}
