"""Test-session settings.

One intra-op thread per process: several tests start 2-4 processes on CI's 2 cores, and OpenMP threads
that spin-wait on descheduled peers make oversubscribed runs 10-30x slower. Results do not depend on it
(every comparison runs both sides under the same setting).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by every subprocess a test starts

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
