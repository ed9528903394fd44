"""The stand-in meta-plugin's own logic (tests/tools/cni/multus-standin), for the
selection forms and result shapes the real node does not exercise."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
from pathlib import Path

STANDIN = Path(__file__).resolve().parent / "tools" / "cni" / "multus-standin"


def load():
    loader = importlib.machinery.SourceFileLoader("multus_standin", str(STANDIN))
    spec = importlib.util.spec_from_loader("multus_standin", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_selection_forms():
    m = load()
    assert m.parse_selection("", "ns1") == []
    assert m.parse_selection("a, other/b@data0 ,c@x", "ns1") == [
        ("ns1", "a", None), ("other", "b", "data0"), ("ns1", "c", "x")]
    assert m.parse_selection(json.dumps([{"name": "a"}, {"name": "b", "namespace": "o",
                                                         "interface": "sig0"}]), "ns1") == [
        ("ns1", "a", None), ("o", "b", "sig0")]


def test_status_entry_takes_only_the_sandbox_interface_and_its_ips():
    m = load()
    result = {"interfaces": [{"name": "br0", "mac": "aa:aa:aa:aa:aa:aa"},
                             {"name": "veth1", "mac": "bb:bb:bb:bb:bb:bb"},
                             {"name": "net1", "mac": "0a:58:0a:01:02:03", "sandbox": "/run/netns/x"}],
              "ips": [{"version": "4", "address": "10.1.2.3/24", "interface": 2},
                      {"address": "fd00::3/64", "interface": 2},
                      {"address": "192.0.2.9/24", "interface": 0}]}
    assert m.status_entry("ns/n", "net1", result) == {
        "name": "ns/n", "interface": "net1", "ips": ["10.1.2.3", "fd00::3"],
        "mac": "0a:58:0a:01:02:03", "dns": {}}
    assert m.status_entry("default-net", "eth0", {}, default=True) == {
        "name": "default-net", "interface": "eth0", "default": True, "dns": {}}


def test_version_and_errors_follow_the_cni_protocol(tmp_path):
    env = {**os.environ, "CNI_COMMAND": "VERSION"}
    out = subprocess.run([str(STANDIN)], input=b"", capture_output=True, env=env, check=True)
    assert "0.4.0" in json.loads(out.stdout)["supportedVersions"]
    env = {**os.environ, "CNI_COMMAND": "ADD", "CNI_PATH": "/nonexistent", "CNI_CONTAINERID": "x",
           "CNI_NETNS": "/nonexistent", "CNI_IFNAME": "eth0"}
    conf = {"cniVersion": "0.4.0", "name": "n", "type": "multus-standin",
            "cacheDir": str(tmp_path), "delegates": [{"type": "bridge"}]}
    out = subprocess.run([str(STANDIN)], input=json.dumps(conf).encode(), capture_output=True, env=env)
    assert out.returncode == 1
    err = json.loads(out.stdout)
    assert err["code"] == 999 and "bridge" in err["msg"]
