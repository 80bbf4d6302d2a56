"""One torch thread for tests, in this process and in the subprocesses they start."""

from __future__ import annotations

import os

#: Tiny pipelines are bound by per-op overhead: a second intra-op thread buys nothing, and on
#: a 2-core machine shared with other jobs OpenMP's waiting threads made each step 50x slower
#: (1.8 s instead of 0.03 s) and a whole test file 8x slower (189 s against 22 s, load ~10).
TEST_THREADS = 1


def one_thread_env() -> dict[str, str]:
    """Return this environment with torch on one thread, unless OMP_NUM_THREADS is set."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(TEST_THREADS))}
