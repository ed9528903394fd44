"""The generated dashboards against Grafana's own dashboard models.

No Grafana server can run here, so the proof is grafana-foundation-sdk (pinned in
the test extras): the Python types Grafana generates from its dashboard schema
(v10.1), with the panel plugins' option types (timeseries, table) and the
Prometheus query type registered. Each dashboard JSON must

1. decode into those models (`Dashboard.from_json`, panels by their plugin);
2. encode back to exactly the same JSON: a key the schema does not know is lost
   on the way, a required field we left out comes back with the SDK's default,
   and a null shows as a missing key, so any of them is a difference;
3. hold values of the declared types everywhere (from_json copies values as they
   are, so the types are checked here against the models' annotations: enums,
   literals, numbers, strings, lists, nested models).
"""
from __future__ import annotations

import enum
import json
import types
import typing
from pathlib import Path

import pytest

from dashboards import generate

sdk = pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk is in the test extras")
from grafana_foundation_sdk.cog.encoder import JSONEncoder  # noqa: E402
from grafana_foundation_sdk.cog.plugins import register_default_plugins  # noqa: E402
from grafana_foundation_sdk.models.dashboard import Dashboard, Panel  # noqa: E402

register_default_plugins()
BOARDS = sorted(generate.JSON_DIR.glob("*.json"))


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: not in Grafana's schema" for k in a if k not in b]
        out += [f"{path}/{k}: required by the schema, missing (default {b[k]!r})" for k in b if k not in a]
        for k in a.keys() & b.keys():
            out += differences(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items became {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} became {b!r}"]


def _hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):        # a forward reference to a plugin-defined variant
        return {}


def conforms(value, hint) -> bool:
    if hint is typing.Any or hint is object:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args and type(value) in {type(a) for a in args}
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict) and (not args or all(conforms(v, args[1]) for v in value.values()))
    if hint is type(None):
        return value is None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in {m.value for m in hint} or isinstance(value, hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        if getattr(hint, "__module__", "").startswith("grafana_foundation_sdk.cog"):
            return True           # variant protocols (Dataquery, PanelOptions): their class is checked below
        return isinstance(value, hint)
    return True                   # a TypeVar or string annotation the SDK leaves unresolved


def _model(hint):
    """The SDK model class a hint names (through Optional and list), or None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return _model(args[0])
    if isinstance(hint, type) and hint.__module__.startswith("grafana_foundation_sdk.models") \
            and hasattr(hint, "from_json"):
        return hint
    return None


def _decoded(value, hint):
    """Some from_json copy nested objects as plain dicts (Panel.transformations):
    decode them with the model the annotation names, so they are checked too."""
    origin = typing.get_origin(hint)
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(inner) == 1:
        return _decoded(value, inner[0])
    if origin is list and inner and isinstance(value, list):
        model = _model(inner[0])
        return [model.from_json(v) if model and isinstance(v, dict) else v for v in value]
    model = _model(hint)
    return model.from_json(value) if model and isinstance(value, dict) else value


def type_errors(obj, path: str = "") -> list[str]:
    if isinstance(obj, list):
        return [e for i, v in enumerate(obj) for e in type_errors(v, f"{path}[{i}]")]
    if isinstance(obj, dict):
        return [e for k, v in obj.items() for e in type_errors(v, f"{path}/{k}")]
    if not type(obj).__module__.startswith("grafana_foundation_sdk.models"):
        return []
    errors = []
    for name, hint in _hints(type(obj)).items():
        value = _decoded(getattr(obj, name, None), hint)
        if not conforms(value, hint):
            errors.append(f"{path}.{name}: {value!r} is not {hint}")
        errors += type_errors(value, f"{path}.{name}")
    return errors


def test_there_are_dashboards():
    assert [p.stem for p in BOARDS] == sorted(p.name.removesuffix(".dashboard.py")
                                             for p in generate.dashboard_sources())


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_dashboard_round_trips_through_grafanas_models(path: Path):
    source = json.loads(path.read_text())
    model = Dashboard.from_json(source)
    assert all(isinstance(p, Panel) for p in model.panels)
    back = json.loads(json.dumps(model, cls=JSONEncoder))
    assert differences(source, back) == []


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_dashboard_values_have_the_schema_types(path: Path):
    model = Dashboard.from_json(json.loads(path.read_text()))
    errors = type_errors(model)
    assert errors == []
    # the walk reached the plugin models: panel options and Prometheus queries
    kinds = {type(p.options).__module__.rsplit(".", 1)[-1] for p in model.panels}
    assert kinds <= {"timeseries", "table"} and kinds
    assert {type(t).__module__.rsplit(".", 1)[-1] for p in model.panels for t in p.targets} == {"prometheus"}


def test_the_checks_catch_what_grafanalib_writes_unfixed():
    """Without schema_form, grafanalib's own output fails both checks."""
    board = generate.load(generate.dashboard_sources()[0])
    raw = json.loads(json.dumps(board.to_json_data(), cls=generate.DashboardEncoder))
    raw = generate._no_nulls(raw)          # nulls alone make from_json raise
    back = json.loads(json.dumps(Dashboard.from_json(raw), cls=JSONEncoder))
    found = differences(raw, back)
    assert any(d.startswith("/sharedCrosshair") for d in found)
    assert any(d.endswith("/showLegend: required by the schema, missing (default False)") for d in found)
    broken = json.loads(generate.render(board))
    broken["graphTooltip"] = 7                       # not a DashboardCursorSync
    broken["panels"][0]["gridPos"]["w"] = "12"       # a string where the schema has an int
    errors = type_errors(Dashboard.from_json(broken))
    assert any(".graph_tooltip" in e for e in errors) and any(".grid_pos.w" in e for e in errors)
