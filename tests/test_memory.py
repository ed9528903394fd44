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


def test_a_trim_only_when_the_process_grew_past_the_slack():
    """After every collection the server asks its Trimmer: trimming gives back
    what the next collection faults in again, so only growth past the slack
    since the last trim is worth it (the first call always trims)."""
    from collector.memory import Trimmer

    rss, trims = [50 << 20], []

    def fake_trim():
        trims.append(rss[0])
        rss[0] = 50 << 20
    trimmer = Trimmer(slack=2 << 20, rss=lambda: rss[0], trim=fake_trim)
    assert trimmer() is True and trims == [50 << 20]
    rss[0] += 1 << 20
    assert trimmer() is False                 # 1 MiB above what the last trim left
    rss[0] += 1 << 20
    assert trimmer() is False                 # 2 MiB: not more than the slack
    rss[0] += 1
    assert trimmer() is True and trims[-1] == (52 << 20) + 1
    assert trimmer() is False


def test_the_trimmer_gives_back_a_heap_that_grew():
    """The real thing: small blocks (heap, not mmapped) freed after a spike
    leave the process at the Trimmer's next call."""
    code = """
from collector.memory import Trimmer, resident_bytes, tune_malloc
tune_malloc()
trimmer = Trimmer()
trimmer()
spike = [bytearray(4000) for _ in range(6000)]      # ~24 MiB in heap blocks
keep = bytearray(4000)                              # above them: the heap cannot shrink from its top
del spike
before = resident_bytes()
print(trimmer(), before >> 20, resident_bytes() >> 20)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "True" and int(out[1]) - int(out[2]) >= 16, out
