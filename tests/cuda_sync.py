"""For the CUDA-only tests: run a piece of work once to warm up (kernels compiled, lazily built state), then again
with every host sync an error."""

import torch


def assert_never_syncs(run) -> None:
    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
