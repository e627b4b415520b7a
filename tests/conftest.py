import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_threads():
    # 2 threads, or OMP_NUM_THREADS when set (scripts/test.sh reruns a subset with one thread)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))
    yield
