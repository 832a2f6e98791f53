import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

# One intra-op thread: env workers and sandboxes run beside the tests on 2 cores, and
# small matmuls slow down badly when threads are oversubscribed.
torch.set_num_threads(1)


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
