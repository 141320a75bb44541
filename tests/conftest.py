"""Test-session settings and the fixtures several test files share.

One intra-op thread per process: several tests start 2-4 processes on CI's 2 cores, and OpenMP threads
that spin-wait on descheduled peers make oversubscribed runs 10-30x slower. Results do not depend on it
(every comparison runs both sides under the same setting). Plain helpers (paths, metrics rows, ports)
are in `testkit.py`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by every subprocess a test starts

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def one_faiss_thread() -> Iterator[None]:
    """OpenMP threads spin-wait: on the shared 2-core CI machine one faiss thread is several times faster
    (PQ training, IVF search)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
