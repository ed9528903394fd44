"""Sources are discovered from collector/sources/, own their flags, and read
typed settings; the example of docs/sources.md runs as written."""
from __future__ import annotations

import argparse
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest

from collector import registry
from collector.model import Attachment, InterfaceView, Pod, PodView
from collector.registry import Config, Snapshot
from exporters.cli import add_serve_flags, add_source_flags
from exporters.exposition import render
from exporters.serve import config_from_args

REPO = Path(__file__).resolve().parent.parent


def test_every_module_of_the_sources_package_is_a_registered_source():
    found = registry.load_sources()
    files = {p.stem for p in (REPO / "collector" / "sources").glob("*.py") if not p.stem.startswith("_")}
    assert set(found) == files == {"attachments", "ebpf", "neighbours", "netlink", "rdma", "routes", "sriov"}


@pytest.fixture
def fake_sources(tmp_path, monkeypatch):
    """A sources package of our own, and an empty registry while the test runs."""
    package = tmp_path / "pw_fake_sources"
    package.mkdir()
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "SOURCES_PACKAGE", "pw_fake_sources")
    monkeypatch.setattr(registry, "SOURCES", {})
    yield package
    for name in [m for m in sys.modules if m.startswith("pw_fake_sources")]:
        del sys.modules[name]


GOOD = textwrap.dedent("""
    from collector.registry import register

    @register("good")
    class Good:
        '''A source that reports nothing.'''
        def __init__(self, config):
            pass
        def collect(self, snapshot):
            return []
""")


def test_a_source_module_that_fails_to_import_stops_the_start(fake_sources):
    (fake_sources / "good.py").write_text(GOOD)
    (fake_sources / "broken.py").write_text("from collector.registry import no_such_name\n")
    with pytest.raises(ImportError, match="no_such_name"):
        registry.load_sources()


def test_a_source_module_that_registers_nothing_is_an_error(fake_sources):
    (fake_sources / "good.py").write_text(GOOD)
    (fake_sources / "silent.py").write_text("X = 1\n")
    with pytest.raises(RuntimeError, match="silent.py registers no source 'silent'"):
        registry.load_sources()


def test_two_classes_under_one_name_are_refused(fake_sources):
    (fake_sources / "good.py").write_text(GOOD + GOOD.replace("class Good", "class Other"))
    with pytest.raises(ValueError, match="registered twice"):
        registry.load_sources()


def test_settings_are_typed_defaulted_and_typos_refused():
    registry.load_sources()
    config = Config(options={"routes": {"interval": "60"}, "sriov": {"all_vfs": "yes"}})
    assert config.settings("routes") == {"interval": 60.0, "min_gap": 1.0, "budget": 0.2, "budget_new": 2.0}
    assert config.settings("sriov")["all_vfs"] is True
    assert config.settings("sriov")["host_netns"] is None
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['intervall'\]"):
        Config(options={"routes": {"intervall": 60}}).settings("routes")


def serve_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_flags(p)
    return p.parse_args(list(argv))


def test_flags_reach_the_sources_settings():
    config = config_from_args(serve_args("--collector.routes.interval", "60", "--collector.ebpf.attach-mode",
                                         "clsact", "--collector.sriov.all-vfs", "--collector.sriov.host-netns", "",
                                         "--collector.neighbours.probe-timeout", "0.5", "--path.procfs", "/p",
                                         "--collector.ebpf.flow-planes", "signaling,data*"))
    assert config.settings("routes")["interval"] == 60.0
    assert config.settings("ebpf") == {"objects_dir": "", "btf_path": "/sys/kernel/btf/vmlinux",
                                       "attach_mode": "clsact", "flow_entries": 16384,
                                       "flow_planes": "signaling,data*"}
    from collector.sources.ebpf import EbpfSource
    wants = EbpfSource(config).with_programs
    assert (wants("signaling"), wants("data-n3"), wants("management")) == (True, True, False)
    assert config.settings("sriov")["all_vfs"] is True and config.settings("sriov")["host_netns"] == ""
    assert config.settings("neighbours")["probe_timeout"] == 0.5
    assert config.paths.procfs == "/p"
    defaults = config_from_args(serve_args())
    assert defaults.settings("sriov")["all_vfs"] is False and defaults.settings("sriov")["host_netns"] is None
    assert EbpfSource(defaults).with_programs("any-plane")          # every plane unless told


def test_a_value_outside_the_choices_is_refused(capsys):
    with pytest.raises(SystemExit):
        serve_args("--collector.ebpf.attach-mode", "xdp")
    assert "invalid choice: 'xdp'" in capsys.readouterr().err


def test_every_source_can_be_switched_off():
    args = serve_args(*(f"--no-collector.{name}" for name in registry.load_sources()))
    assert not any(getattr(args, f"collector_{name}") for name in registry.load_sources())


def test_the_documented_example_source(monkeypatch):
    text = (REPO / "docs" / "sources.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.setattr(registry, "SOURCES", {})
    module = types.ModuleType("plane_pods")
    exec(compile(code, "docs/sources.md", "exec"), module.__dict__)
    spec = registry.SOURCES["plane_pods"]
    p = argparse.ArgumentParser()
    add_source_flags(p, spec)
    args = p.parse_args(["--collector.plane_pods.prefix", "d"])
    assert args.collector_plane_pods is True

    def pod(name: str, *planes: str) -> PodView:
        atts = tuple(Attachment("ns", name, name, f"ns/{p}", f"net{i}", plane=p) for i, p in enumerate(planes))
        return PodView(Pod("ns", name, name, attachments=atts),
                       interfaces=tuple(InterfaceView(a, None) for a in atts))

    source = spec.factory(Config(options={"plane_pods": {"prefix": args.collector_plane_pods__prefix}}))
    text = render(source.collect(Snapshot(pods=(pod("a", "data", "oam"), pod("b", "data"), pod("c", "dmz")))))
    assert 'planewatch_plane_pods{plane="data"} 2\n' in text.decode()
    assert 'planewatch_plane_pods{plane="dmz"} 1\n' in text.decode()
    assert "oam" not in text.decode()
