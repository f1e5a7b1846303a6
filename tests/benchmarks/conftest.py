import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: with 2 OpenMP threads on a busy machine, index_add_ waits ~80 ms per call (1 thread: ~5 us)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
