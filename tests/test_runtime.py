"""Host memory reuse on CPU: after keep_freed_host_memory(), a freed large tensor's pages serve
the next one, so a training step stops page-faulting on its large buffers."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

_CHILD = """
import resource, sys, torch
from seqrec.runtime import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
def step():
    # the shape of a training step's large buffers: overlapping lifetimes, sizes above malloc's
    # mmap threshold, freed in another order than allocated
    scores = torch.empty(40 * 2**20).fill_(1.0)
    table_grad = torch.empty(33 * 2**20).fill_(2.0)
    cast = torch.empty(16 * 2**20).fill_(3.0)
    del scores
    embedding_grad = torch.empty(33 * 2**20).fill_(4.0)
    del cast, table_grad, embedding_grad
for _ in range(8):  # the heap grows to its working size over the first steps
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _steady_state_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_large_tensors_are_reused_without_page_faults():
    pages_per_step = (40 + 33 + 16 + 33) * 2**20 * 4 // 4096
    default, kept = _steady_state_faults("default"), _steady_state_faults("keep")
    assert default > 2 * pages_per_step  # mapped afresh, every page faults again on each step
    assert kept < pages_per_step // 100, (default, kept)  # reused: the heap stopped growing


def test_importing_seqrec_bounds_the_onednn_primitive_cache_unless_the_user_set_it():
    probe = "import os, seqrec; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    environment = {key: value for key, value in os.environ.items() if key != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    ours = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=environment, timeout=60)
    theirs = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            env={**environment, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})
    assert (ours.stdout.strip(), theirs.stdout.strip()) == ("64", "1024"), (ours.stderr, theirs.stderr)
