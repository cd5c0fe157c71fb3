"""Test-wide settings.

torch's default intra-op thread pool oversubscribes a small shared CPU (other processes, the
2-process data-parallel tests): tiny operations then run orders of magnitude slower. Tests use one
thread unless KDBENCH_TEST_THREADS says otherwise; results do not depend on it beyond float noise.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("KDBENCH_TEST_THREADS", "1"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

try:
    import torch

    torch.set_num_threads(int(os.environ.get("KDBENCH_TEST_THREADS", "1")))
except ImportError:  # pragma: no cover
    pass
