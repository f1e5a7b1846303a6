"""Test-wide setup. TRITON_INTERPRET must be set before triton is first imported: it takes effect when @triton.jit
decorates, and lets the Triton kernels run on CPU tensors (a GPU run may export TRITON_INTERPRET=0 beforehand)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
