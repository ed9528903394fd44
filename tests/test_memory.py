"""collector/memory.py: with the malloc settings `serve` makes, the buffers a
collection drops go back to the kernel instead of staying in the heap."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

CHURN = """
import sys
from collector.memory import tune_malloc, trim
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) // 1024
tuned = tune_malloc() if sys.argv[1] == 'tuned' else None
before = rss()
first = bytearray(8 << 20)  # freed: glibc's dynamic threshold rises to 8 MB
del first
kept = []
for _ in range(40):         # a collection's megabyte buffers, between blocks that stay
    garbage = bytearray(1 << 20)
    kept.append(bytearray(1000))
    del garbage
    garbage = [bytearray(1 << 20) for _ in range(8)]
    kept.append(bytearray(1000))
    del garbage
if sys.argv[1] == 'tuned':
    trim()
print(tuned, before, rss())
"""


def run(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_dropped_buffers_leave_the_process():
    tuned, before, after = run("tuned")
    assert tuned == "True"                        # glibc here: the settings were taken
    held_tuned = after - before                   # MiB still held after 40 rounds of 9 MiB
    _, before, after = run("plain")               # glibc's defaults on the same churn
    held_plain = after - before
    print(f"RSS held after the churn: tuned {held_tuned} MiB, glibc defaults {held_plain} MiB")
    assert held_tuned < 4 and held_plain >= held_tuned + 4, (held_tuned, held_plain)
