import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

# Two cores: keep torch from oversubscribing them when sandboxes or workers run beside it.
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
