"""The image's root filesystem (deploy/rootfs.py) leaves parts of the standard library
out: none of them may be one that planewatch's code loads. Root-free; the image itself
is built and run by tests/test_real_node.py."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import REPO

# Every module of the packages the image installs (dashboards needs grafanalib, an
# extra the image leaves out), imported in a fresh interpreter: what they load at
# import time is what the image must have.
IMPORT_ALL = """
import importlib, json, pkgutil, sys
import kernel, collector, exporters, ebpf
for pkg in (kernel, collector, exporters, ebpf):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
print(json.dumps(sorted(f for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None)))))
"""


def rootfs():
    spec = importlib.util.spec_from_file_location("rootfs", Path(REPO) / "deploy" / "rootfs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_left_out_matches_packages_files_and_extension_modules():
    r = rootfs()
    for path in ("sqlite3/__init__.py", "test/support/__init__.py", "turtle.py",
                 "lib-dynload/readline.cpython-311-x86_64-linux-gnu.so",
                 "lib-dynload/_testcapi.cpython-311-x86_64-linux-gnu.so", "config-3.11-x86_64-linux-gnu/Makefile"):
        assert r.left_out(path), path
    for path in ("ssl.py", "asyncio/base_events.py", "email/parser.py", "unittest/mock.py",
                 "lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so", "lib-dynload/_ctypes.cpython-311-x86_64-linux-gnu.so",
                 "testing.py", "curses_helper.py"):
        assert not r.left_out(path), path


def test_nothing_planewatch_imports_is_left_out_of_the_image():
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=str(REPO), capture_output=True,
                         text=True, check=True).stdout
    stdlib = sysconfig.get_paths()["stdlib"].rstrip("/") + "/"
    # `site` imports Debian's sitecustomize.py (a link into /etc/python3.x) at start
    # on Debian's interpreter: a hook of the interpreter, not an import of ours, and
    # left out of the image on purpose
    loaded = [f.removeprefix(stdlib) for f in json.loads(out)
              if f.startswith(stdlib) and f.removeprefix(stdlib) not in ("sitecustomize.py", "usercustomize.py")]
    assert len(loaded) > 50 and "ssl.py" in loaded, loaded          # the walk did import
    r = rootfs()
    assert [f for f in loaded if r.left_out(f)] == []
