"""Imports follow the data: discovery -> resolution -> sources -> exposition -> HTTP
-> the command. A module may import its own layer and the layers before it, never
one after it (an arrow against the flow), and no module imports itself through
others (a cycle). Function-level imports count: they are still dependencies.

Every module of the runtime packages must be placed in a layer here, so a new
module is a decision, not an accident."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNTIME = ("kernel", "ebpf", "collector", "exporters")
TOOLS = ("lab", "dashboards")          # development tools: stand on the runtime, never under it

# (layer, module or package prefixes), in the order data flows.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernel", ("kernel", "ebpf", "collector", "collector.model", "collector.family", "collector.intervals",
                "collector.sysfs_safe", "collector.caps", "collector.memory")),
    ("discovery", ("collector.annotations", "collector.nad", "collector.netnames", "collector.planes",
                   "collector.budgets", "collector.discovery", "collector.kube", "collector.kubeclient",
                   "collector.podsfile",
                   "collector.whereabouts", "collector.whereabouts_ranges")),
    ("resolution", ("collector.netns", "collector.netns_pool", "collector.cgroups", "collector.claims")),
    ("sources", ("collector.registry", "collector.sources", "collector.sriov_readers", "collector.sriov_sysfs",
                 "collector.sriov_metrics", "collector.vfinfo", "collector.routes_analysis",
                 "collector.gateway_probe", "collector.whereabouts_metrics")),
    ("exposition", ("exporters", "exporters.exposition", "exporters.metrics")),
    ("http", ("exporters.http", "exporters.listener", "exporters.httpstats", "exporters.webauth",
              "exporters.webconfig")),
    ("command", ("exporters.cli", "exporters.serve", "exporters.cluster", "exporters.inspect")),
    ("tools", TOOLS),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in RUNTIME + TOOLS:
        for path in sorted((REPO / package).rglob("*.py")):
            if "build" not in path.parts and path.name != "__main__.py":
                found[module_name(path)] = path
    # the dashboards' sources are named *.dashboard.py: not importable modules
    return {name: path for name, path in found.items() if "." not in path.stem}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # `from pkg import mod` names the module; `from mod import func` the module
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def layer_of(module: str) -> int:
    best, rank = "", -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, i
    return rank


MODULES = modules()
GRAPH = {name: imports_of(path, set(MODULES)) - {name} for name, path in MODULES.items()}


def test_every_runtime_module_has_a_layer_of_its_own():
    """A package's prefix places its new modules by default only for the packages
    that are one layer throughout (kernel, ebpf, the tools)."""
    whole = {"kernel", "ebpf", *TOOLS}
    unplaced = [m for m in MODULES if m.split(".")[0] not in whole
                and not any(m in prefixes for _, prefixes in LAYERS)
                and not m.startswith("collector.sources.")]
    assert unplaced == [], "place these modules in a layer of tests/test_import_graph.py"


def back_arrows(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
                  for m, deps in graph.items() for dep in deps if layer_of(dep) > layer_of(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def test_no_import_against_the_flow():
    assert len(GRAPH) > 60 and sum(map(len, GRAPH.values())) > 120      # the walk found the code
    assert back_arrows(GRAPH) == []


def test_no_cycle():
    assert cycles(GRAPH) == []


@pytest.mark.parametrize("package", RUNTIME)
def test_the_runtime_never_imports_the_tools(package):
    leaks = sorted(f"{m} imports {dep}" for m, deps in GRAPH.items() if m.split(".")[0] == package
                   for dep in deps if dep.split(".")[0] in TOOLS)
    assert leaks == []


def test_the_checker_sees_a_back_arrow_and_a_cycle(tmp_path):
    """The rules above, on imports that break them (the old shapes of this code)."""
    source = tmp_path / "m.py"
    source.write_text("from collector.family import Family\n\ndef f():\n    from exporters.serve import build_server\n")
    assert imports_of(source, set(MODULES)) == {"collector.family", "exporters.serve"}
    assert back_arrows({"collector.sources.netlink": {"exporters.exposition"}}) == [
        "collector.sources.netlink (sources) imports exporters.exposition (exposition)"]
    assert back_arrows({"ebpf.loader": {"kernel.nsenter"}}) == []
    assert cycles({"exporters.cli": {"exporters.cluster"}, "exporters.cluster": {"exporters.cli"},
                   "collector.model": set()}) == [["exporters.cli", "exporters.cluster"]]
