"""The docs' reference pages, generated from the declarations the code itself uses.

`docs/gen_pages.py` (mkdocs-gen-files) writes them into the site at build time, so nothing is written
twice: the counter table (serving_mfu.cost.counters.COUNTERS), the report and endpoint schema (the
OpenAPI document the server serves), the Prometheus families (the collector's own) and recording
rules (deploy/prometheus), and the architecture registry.  `tests/test_docs.py` holds the pages to the
code: every series and every report field is named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import yaml

from serving_mfu.cost.counters import COUNTERS, docs_table
from serving_mfu.model.architectures import ALIASES, PARSERS
from serving_mfu.serve.api import build_app
from serving_mfu.serve.prometheus import MFUCollector

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "serving_mfu_rules.yml"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------ counters
def counters_page() -> str:
    return ("# Counters\n\n"
            "Every cumulative sum serving-mfu keeps, declared once in `serving_mfu/cost/counters.py` "
            "(`COUNTERS`).  The per-step cost, the engines' snapshots, the `/metrics/mfu` report, the "
            "Prometheus series and this table are derived from that declaration (`serving-mfu counters` "
            "prints it).\n\n"
            "A report path `prefill./decode.X` is field `X` of both phase sections; per-phase counters are "
            "exported with a `phase` label, and every series carries `engine`, `model` and `kv_role`.\n\n"
            + docs_table(COUNTERS))


# ------------------------------------------------------------------------------ endpoint
def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _type(schema: dict, node: Any) -> str:
    if not isinstance(node, dict):
        return "any"
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[1]
    if "anyOf" in node:
        return " or ".join(_type(schema, n) for n in node["anyOf"])
    if node.get("type") == "array":
        return f"list of {_type(schema, node.get('items', {}))}"
    if node.get("type") == "object" and "additionalProperties" in node:
        return f"map of {_type(schema, node['additionalProperties'])}"
    if "enum" in node:
        return " / ".join(f"`{v}`" for v in node["enum"])
    return node.get("type", "any")


def _children(schema: dict, node: dict) -> dict | None:
    """The object schema a field holds (itself, a list's items, or the non-null branch), if any."""
    for cand in [node, node.get("items", {})] + node.get("anyOf", []):
        cand = _resolve(schema, cand)
        if cand.get("properties"):
            return cand
    return None


def fields(schema: dict, node: dict, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(dotted path, type, description) of every field under a schema node, depth first."""
    node = _resolve(schema, node)
    for name, prop in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        yield path, _type(schema, prop), prop.get("description") or _resolve(schema, prop).get("description", "")
        child = _children(schema, prop)
        if child is not None:
            yield from fields(schema, child, path + ("[]." if _resolve(schema, prop).get("type") == "array" else "."))


def _response_schema(schema: dict, op: dict) -> dict:
    return op["responses"]["200"]["content"]["application/json"]["schema"]


def endpoint_page() -> str:
    """Every endpoint's query parameters, statuses and response fields, from the served OpenAPI schema."""
    schema = build_app(lambda: None).openapi()  # type: ignore[arg-type, return-value]
    out = ["# Endpoint reference\n",
           "Generated from the OpenAPI document the server serves (`/openapi.json` on `serving-mfu serve`; "
           "the plugin adds the same routes to vLLM's server).  Every answer is JSON.\n"]
    for path, ops in schema["paths"].items():
        op = ops.get("get")
        if op is None or not path.startswith("/metrics/mfu"):
            continue
        out.append(f"## `GET {path}`\n\n{op.get('summary', '')}.\n")
        params = op.get("parameters", [])
        if params:
            out.append("| query parameter | type | what it does |\n|---|---|---|")
            for p in params:
                s = p.get("schema", {})
                bounds = ", ".join(f"{k} {s[k]}" for k in ("minimum", "exclusiveMinimum", "maximum") if k in s)
                out.append(f"| `{p['name']}` | {s.get('type', '')}{f' ({bounds})' if bounds else ''} | "
                           f"{_cell(p.get('description', ''))} |")
            out.append("")
        out.append("| status | meaning |\n|---|---|")
        for code, resp in sorted(op["responses"].items()):
            out.append(f"| {code} | {_cell(resp.get('description', ''))} |")
        out.append("\n| field | type | description |\n|---|---|---|")
        for name, kind, doc in fields(schema, _response_schema(schema, op)):
            out.append(f"| `{name}` | {_cell(kind)} | {_cell(doc)} |")
        out.append("")
    return "\n".join(out) + "\n"


def report_field_paths() -> list[str]:
    """Every field path of the /metrics/mfu answer (tests: each is named in the docs)."""
    schema = build_app(lambda: None).openapi()  # type: ignore[arg-type, return-value]
    return [p for p, _, _ in fields(schema, _response_schema(schema, schema["paths"]["/metrics/mfu"]["get"]))]


# ------------------------------------------------------------------------------ Prometheus
class _NoEngines:
    def refresh(self) -> list:
        return []


def series() -> list[tuple[str, str, str, str]]:
    """(exposed name, type, labels, help) of every family the collector exports."""
    collector = MFUCollector(_NoEngines())
    labels = collector.family_labels()
    out = []
    for fam in collector.describe():
        name = fam.name + ("_total" if fam.type == "counter" else "_info" if fam.type == "info" else "")
        out.append((name, fam.type, ", ".join(labels[fam.name]), fam.documentation))
    return out


def recording_rules() -> list[tuple[str, str]]:
    """(record, expr) of every recording rule in deploy/prometheus/serving_mfu_rules.yml."""
    data = yaml.safe_load(RULES.read_text())
    return [(r["record"], " ".join(r["expr"].split())) for g in data["groups"] for r in g["rules"] if "record" in r]


def prometheus_page() -> str:
    out = ["# Prometheus series and recording rules\n",
           "Generated from the collector's own families (`serving_mfu/serve/prometheus.py`, the counters "
           "from `COUNTERS`) and from `deploy/prometheus/serving_mfu_rules.yml`.  How to use them: "
           "[Prometheus](../prometheus.md).\n",
           "## Series\n", "| series | type | labels | what it is |", "|---|---|---|---|"]
    out += [f"| `{name}` | {kind} | {labels} | {_cell(doc)} |" for name, kind, labels, doc in series()]
    out += ["\n## Recording rules\n", "| record | expression |", "|---|---|"]
    out += [f"| `{record}` | `{_cell(expr)}` |" for record, expr in recording_rules()]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------ architectures
def architectures_page() -> str:
    out = ["# Architectures (generated)\n",
           "Every `model_type` with a registered formula (`@register` in `serving_mfu/model/architectures.py` "
           "and `families.py`), and the types read as another.  Any other type transformers can build takes "
           "the `derived` path ([Supported architectures](../architectures.md)).\n",
           "| model_type | path | parser |", "|---|---|---|"]
    for name, fn in sorted(PARSERS.items()):
        out.append(f"| `{name}` | formula | `{fn.__module__}.{fn.__qualname__}` |")
    for name, target in sorted(ALIASES.items()):
        out.append(f"| `{name}` | formula, read as `{target}` | alias |")
    return "\n".join(out) + "\n"


PAGES = {"reference/counters.md": counters_page, "reference/endpoint.md": endpoint_page,
         "reference/prometheus.md": prometheus_page, "reference/architectures.md": architectures_page}


if __name__ == "__main__":  # print the pages, e.g. to look at them without building the site
    print(json.dumps({name: make() for name, make in PAGES.items()}, indent=1)[:2000])
