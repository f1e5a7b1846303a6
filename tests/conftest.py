"""Test-wide setup. TRITON_INTERPRET must be set before triton is first imported: it takes effect when @triton.jit
decorates, and lets the Triton kernels run on CPU tensors (a GPU run may export TRITON_INTERPRET=0 beforehand)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after TRITON_INTERPRET)
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: with 2 OpenMP threads on a busy machine, index_add_ waits ~80 ms per call (1 thread: ~5 us)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
