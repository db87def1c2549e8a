"""keep_freed_memory (hatchling/malloc.py): a process that calls it reuses the memory it frees, where
glibc's malloc otherwise maps a large block afresh each time, so the kernel faults in and zeroes its pages
again (a hybrid training step's temporaries: docs/benchmarks.md). Each run in a process of its own: the
setting is process-wide."""

import platform
import subprocess
import sys

import pytest

ALLOCATE = """
import resource, sys, torch
from hatchling.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):                     # 64 MiB, freed at once: glibc's bins settle within ~8 rounds
    torch.ones(1 << 24)
before = faults()
for _ in range(3):
    torch.ones(1 << 24)
print(faults() - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_freed_block_is_reused_without_faulting_its_pages_in_again():
    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", ALLOCATE, mode], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    assert faults("default") >= 3 * (64 << 20) // (2 << 20)    # mapped anew: a fault per page (per 2 MiB huge page)
    assert faults("keep") <= 4
