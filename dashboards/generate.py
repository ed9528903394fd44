"""Shared dashboard pieces, and the writer of dashboards/json/*.json.

Each `dashboards/<name>.dashboard.py` builds a grafanalib `dashboard` from the
pieces below (one data source variable, one set of template variables, one way
to lay out panels) so the four dashboards filter alike. This module then renders
every dashboard to `dashboards/json/<name>.json`, deterministically (sorted keys,
panel ids in layout order), and lists every PromQL query they contain so that
tests can parse them and the lab can run them against a live Prometheus.

    python3 -m dashboards.generate            # rewrite dashboards/json/
    python3 -m dashboards.generate --check    # exit 1 if any JSON is stale
    python3 -m dashboards.generate --list     # print every query, one per line
"""
from __future__ import annotations

import argparse
import json
import re
import runpy
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import attr
from grafanalib._gen import DashboardEncoder
from grafanalib.core import Dashboard, GridPos, Table, Target, Template, Templating, Time, TimeSeries

HERE = Path(__file__).resolve().parent
JSON_DIR = HERE / "json"

# Never a bare data source name: every panel, target and query variable points at
# the `datasource` variable, so the JSON imports into any Grafana unchanged.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Grafana 9/10 schema: panels are written in the fieldConfig form it expects,
# so it has nothing to migrate.
SCHEMA_VERSION = 37

# Label filters every per-interface query carries; `=~` so "All" (.*) also
# matches series without a `node` label (no relabelling in that cluster).
FILTERS = ('node=~"$node"', 'namespace=~"$namespace"', 'pod=~"$pod"', 'plane=~"$plane"')


# ---------------------------------------------------------------- building blocks

def selector(*extra: str, filters: tuple[str, ...] = FILTERS) -> str:
    """`{node=~"$node", ..., <extra>}` for a metric selector."""
    return "{" + ", ".join(filters + extra) + "}"


def _query_variable(name: str, label: str, query: str, *, multi: bool) -> Template:
    variable = Template(
        name=name, label=label, query=query, dataSource=DATASOURCE,
        includeAll=multi, multi=multi, allValue=".*" if multi else None,
        refresh=2,  # 2 = on time range change
    )
    if multi:
        # Grafana's own form for "All" selected; grafanalib has no argument for it.
        variable._current = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return variable


def templating(single_pod: bool = False) -> Templating:
    """datasource, node, namespace, pod, plane: the same on every dashboard.

    With `single_pod` the namespace and pod variables pick exactly one value (the
    pod drill-down); elsewhere they are multi-select with "All".
    """
    info = "planewatch_pod_interface_info"
    multi = not single_pod
    return Templating(list=[
        Template(name="datasource", label="Data source", query="prometheus",
                 type="datasource", default="Prometheus"),
        _query_variable("node", "Node", "label_values(planewatch_build_info, node)", multi=True),
        _query_variable("namespace", "Namespace",
                        f'label_values({info}{{node=~"$node"}}, namespace)', multi=multi),
        _query_variable("pod", "Pod",
                        f'label_values({info}{{node=~"$node", namespace=~"$namespace"}}, pod)',
                        multi=multi),
        _query_variable("plane", "Plane", f'label_values({info}{{node=~"$node"}}, plane)',
                        multi=True),
    ])


def target(expr: str, legend: str = "", *, instant: bool = False) -> Target:
    """A Prometheus query; instant ones feed tables."""
    return Target(expr=expr, legendFormat=legend, datasource=DATASOURCE, instant=instant,
                  format="table" if instant else "time_series")


def _with_ref_ids(targets: list[Target]) -> list[Target]:
    return [attr.evolve(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)]


def dashed(legend_regex: str) -> dict:
    """A field override drawing the series whose name matches as a dashed line."""
    return {"matcher": {"id": "byRegexp", "options": legend_regex},
            "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]}


def graph(title: str, targets: list[Target], unit: str, description: str = "",
          overrides: list[dict] | None = None) -> TimeSeries:
    """A time series panel; the layout gives it its place."""
    return TimeSeries(title=title, description=description, dataSource=DATASOURCE,
                      targets=_with_ref_ids(targets), unit=unit, legendDisplayMode="table",
                      legendPlacement="right", legendCalcs=["mean", "max"], tooltipMode="multi",
                      overrides=overrides or [])


def table(title: str, targets: list[Target], description: str = "",
          value_text: dict[str, str] | None = None) -> Table:
    """An instant table of label sets; `value_text` maps values to words (rp_filter)."""
    transformations = [{"id": "merge", "options": {}}] if len(targets) > 1 else []
    transformations.append({"id": "organize", "options": {
        "excludeByName": {"Time": True, "__name__": True, "job": True}}})
    extra = None
    if value_text:
        extra = {"fieldConfig": {"defaults": {"mappings": [{
            "type": "value",
            "options": {value: {"text": text, "index": i}
                        for i, (value, text) in enumerate(sorted(value_text.items()))},
        }]}}}
    return Table(title=title, description=description, dataSource=DATASOURCE,
                 targets=_with_ref_ids(targets), transformations=transformations,
                 filterable=True, extraJson=extra)


def layout(rows: list[list], height: int = 8) -> list:
    """Panels placed row by row, each row split evenly across the 24 grid columns."""
    placed, y = [], 0
    for row in rows:
        width = 24 // len(row)
        for i, panel in enumerate(row):
            placed.append(attr.evolve(panel, gridPos=GridPos(h=height, w=width, x=i * width, y=y)))
        y += height
    return placed


def dashboard(title: str, uid: str, description: str, rows: list[list],
              single_pod: bool = False) -> Dashboard:
    """A planewatch dashboard with stable uid and panel ids."""
    return Dashboard(
        title=title, uid=uid, description=description, tags=["planewatch", "multus"],
        templating=templating(single_pod), panels=layout(rows), time=Time("now-1h", "now"),
        refresh="30s", timezone="browser", schemaVersion=SCHEMA_VERSION,
        graphTooltip=1,  # shared crosshair
    ).auto_panel_ids()


# ---------------------------------------------------------------- rendering

def dashboard_sources(directory: Path = HERE) -> list[Path]:
    """Every `*.dashboard.py`, sorted so output order never depends on the filesystem."""
    return sorted(directory.glob("*.dashboard.py"))


def load(path: Path) -> Dashboard:
    """The `dashboard` object a `*.dashboard.py` file defines."""
    found = runpy.run_path(str(path)).get("dashboard")
    if not isinstance(found, Dashboard):
        raise ValueError(f"{path} defines no grafanalib Dashboard named `dashboard`")
    return found


# grafanalib still writes fields of Grafana's pre-schema dashboards (rows, the old
# table and graph panels, graphite targets) and `null` for unset optional fields.
# Grafana's dashboard schema (v10.1, checked by tests/test_grafana_schema.py
# with grafana-foundation-sdk's models) knows none of them and has no nulls.
LEGACY_KEYS = {
    "dashboard": ("__inputs", "hideControls", "rows", "sharedCrosshair"),
    "panel": ("editable", "error", "hideTimeOverride", "color", "columns", "fontSize", "mappings"),
    "target": ("metric", "query", "step", "target"),
    "variable": ("useTags",),
}
# Fields the schema requires that grafanalib leaves out, with Grafana's defaults
# (showLegend has none: without it a strict reader hides every legend).
REQUIRED = {
    "dashboard": {"fiscalYearStartMonth": 0},
    "timepicker": {"collapse": False, "enable": True},
    "panel": {"repeatDirection": "h"},
    "legend": {"showLegend": True},
    "table": {"cellHeight": "sm", "footer": {"countRows": False, "reducer": [], "show": False},
              "frameIndex": 0, "showTypeIcons": False},
    "variable": {"id": "00000000-0000-0000-0000-000000000000", "skipUrlSync": False},
}


def _no_nulls(value):
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_no_nulls(v) for v in value]
    return value


def _fill(obj: dict, kind: str) -> None:
    for key in LEGACY_KEYS.get(kind, ()):
        obj.pop(key, None)
    for key, default in REQUIRED.get(kind, {}).items():
        obj.setdefault(key, json.loads(json.dumps(default)))


def schema_form(data: dict) -> dict:
    """grafanalib's JSON in the form of Grafana's dashboard schema."""
    data = _no_nulls(data)
    _fill(data, "dashboard")
    _fill(data.setdefault("timepicker", {}), "timepicker")
    for panel in data.get("panels", []):
        _fill(panel, "panel")
        for target in panel.get("targets", []):
            _fill(target, "target")
        options = panel.get("options", {})
        if "legend" in options:
            _fill(options["legend"], "legend")
        if panel.get("type") == "table":
            _fill(options, "table")
    for variable in data.get("templating", {}).get("list", []):
        _fill(variable, "variable")
        current = variable.get("current")
        if current is not None:         # a VariableOption: text and value are required
            current.pop("tags", None)
            current.setdefault("text", "")
            current.setdefault("value", "")
    return data


def render(board: Dashboard) -> str:
    """JSON text of a dashboard: sorted keys, two-space indent, final newline."""
    data = json.loads(json.dumps(board.to_json_data(), cls=DashboardEncoder))
    return json.dumps(schema_form(data), sort_keys=True, indent=2) + "\n"


def rendered() -> dict[str, str]:
    """`<name>.json` → JSON text, for every dashboard source."""
    return {path.name.removesuffix(".dashboard.py") + ".json": render(load(path))
            for path in dashboard_sources()}


def stale_files(outputs: dict[str, str], directory: Path = JSON_DIR) -> list[str]:
    """Names whose committed JSON differs from `outputs`, plus JSON with no source."""
    stale = [name for name, text in outputs.items()
             if not (directory / name).exists() or (directory / name).read_text() != text]
    orphans = [p.name for p in directory.glob("*.json") if p.name not in outputs]
    return sorted(stale + orphans)


# ---------------------------------------------------------------- queries

class Query(NamedTuple):
    dashboard: str      # uid
    panel: str          # panel title, or "$<name>" for a template variable
    kind: str           # "target" | "template"
    expr: str           # exactly as in the JSON (Grafana variables unexpanded)


def queries_of(board_json: dict) -> Iterator[Query]:
    """Every panel target expr and every query-variable query of one dashboard JSON."""
    uid = board_json["uid"]
    for panel in board_json.get("panels", []):
        for t in panel.get("targets", []):
            yield Query(uid, panel["title"], "target", t["expr"])
    for variable in board_json["templating"]["list"]:
        if variable["type"] == "query":
            yield Query(uid, "$" + variable["name"], "template", variable["query"])


def all_queries() -> list[Query]:
    """Every query of every dashboard, as the generated JSON holds them."""
    return [q for text in rendered().values() for q in queries_of(json.loads(text))]


_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$", re.S)
_INTERVALS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")
_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)")


def variables_used(expr: str) -> set[str]:
    """Names of the dashboard variables an expression refers to (not Grafana's `$__*`)."""
    return {a or b for a, b in _VARIABLE.findall(expr)} - {"__rate_interval", "__interval", "__range"}


def to_promql(expr: str, values: dict[str, str] | None = None, interval: str = "5m") -> str:
    """Plain PromQL for a panel or template query.

    `label_values(sel, label)` becomes `count by (label) (sel)` (non-empty when the
    variable would have values); `$__rate_interval` and friends become `interval`;
    each `$var` becomes `values[var]`, default `.*` (what "All" sends).
    """
    values = values or {}
    match = _LABEL_VALUES.match(expr.strip())
    if match:
        expr = f"count by ({match['label']}) ({match['selector']})"
    expr = _INTERVALS.sub(interval, expr)
    return _VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), ".*"), expr)


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if dashboards/json is stale")
    mode.add_argument("--list", action="store_true", help="print every query as PromQL")
    args = parser.parse_args(argv)
    if args.list:
        for q in all_queries():
            print(f"{q.dashboard}\t{q.panel}\t{to_promql(q.expr)}")
        return 0
    outputs = rendered()
    if args.check:
        stale = stale_files(outputs)
        for name in stale:
            print(f"{JSON_DIR / name} is stale: run python3 -m dashboards.generate", file=sys.stderr)
        return 1 if stale else 0
    JSON_DIR.mkdir(exist_ok=True)
    for name, text in outputs.items():
        (JSON_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
