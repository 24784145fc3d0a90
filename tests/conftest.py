"""Shared test set-up: tests never download, never use a GPU unless one is there, and run in float64 where they
compare against slow references."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

# at most 2 threads (CI's cores), fewer when OMP_NUM_THREADS asks (tests beside a training run)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS") or 2))))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
