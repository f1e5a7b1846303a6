"""On CUDA (skipped elsewhere; benchmarks/gpu_checks.sh runs it): a prefill and a KV-cache decode step under fixed
routings (set_weights, one adapter per row, per-token experts) never wait for the GPU once the routing is in force."""

import pytest
import torch

import lorahub_engine as le
from tests.cuda_sync import assert_never_syncs
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def adapters(model, n=3):
    out = []
    for i in range(n):
        adapter = le.init_adapter(model, f"a{i}", ["q_proj", "v_proj", "down_proj"], r=4, seed=i)
        for m in adapter.modules.values():
            m.B.normal_(generator=torch.Generator().manual_seed(i))
        out.append(adapter)
    return out


@pytest.mark.parametrize("how", ["set_weights", "one_per_row", "per_token"])
def test_fixed_routings_never_sync(how):
    base = tiny_llama()
    model = le.attach(base, adapters(base)).cuda().to(torch.bfloat16)
    ids = torch.randint(0, base.config.vocab_size, (2, 12), device="cuda")
    routings = {"set_weights": None, "one_per_row": [[0], [2]],
                "per_token": torch.randint(-1, 3, (ids.numel(), 2), generator=torch.Generator().manual_seed(0))}
    if how == "set_weights":
        le.set_weights(model, [0.5, 0.2, 0.3])

    def run():  # a prefill and, but per token, one decode step on its KV cache (generate() and transformers' code
        with torch.no_grad():  # for attention masks read values back on their own: neither is used here)
            out = model(ids, use_cache=True)
            if how != "per_token":  # per-token routing covers one forward's tokens, not a decode step's
                model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)

    routing = le.routing(model, routings[how]) if routings[how] is not None else torch.no_grad()
    with routing:
        assert_never_syncs(run)
