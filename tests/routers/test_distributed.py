"""train_router under torch.distributed: 2 CPU processes (gloo, joined from torchrun's environment variables) end
with identical weights, equal to one process that averages the two shards' gradients, and, where every loss is a
mean over examples, to one process training on the concatenated batch. `route train` under torchrun: rank 0
alone writes and prints."""

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from lorahub_engine.attach import router_outputs
from lorahub_engine.cli import main
from lorahub_engine.fewshot import example_losses
from lorahub_engine.ops import torch_backend
from lorahub_engine.search.objective import encode_pairs
from lorahub_engine.zoo import AdapterZoo
from routers import LoRAMoEConfig, MoLEConfig, SiRAConfig, attach_router, train_router
from routers.api import router_parameters, routers_of
from routers.train import _batches, summarize
from tests.routers.conftest import experts
from tests.tiny_models import tiny_llama_for, word_tokenizer

WORDS = [f"w{i}" for i in range(20)]
EXAMPLES = [(" ".join(f"w{(i * j) % 20}" for j in range(1, 2 + i % 4)), f"w{(i + 1) % 20}") for i in range(10)]
WORLD, BATCH, STEPS, LR, SEED = 2, 3, 4, 5e-2, 0  # per rank: 3 examples; a step's global batch: 6

# id: (config, pooled). Every case is compared with one process averaging the shards' gradients (the same sums, so
# equal to rounding; the grouped op's walk is pinned to the compiled one, whose sums are the same in every process,
# where the dense walk's matmuls were seen to round differently in the suite's process than in a fresh one). `pooled` cases, whose loss is a smooth mean over examples (no auxiliary loss, no top-k), also
# with one process on the concatenated batch. Not top-k there: its renormalized gates leave gradient coordinates that
# are exactly 0 in exact arithmetic, and Adam's first steps turn their rounding noise, which depends on the order of
# the sums, into steps of size lr. A trainable-expert config (SiRA, LoRAMoE; dropout 0) is one more entry: the test
# compares every tensor of the model.
CASES = {
    "mole-dense": (MoLEConfig(top_k=None, balance_weight=0.0), True),
    "mole-dense-sequence": (MoLEConfig(top_k=None, granularity="sequence", balance_weight=0.0), True),
    "mole-top2-balance": (MoLEConfig(top_k=2, balance_weight=0.5), False),
    "sira-top2": (SiRAConfig(num_experts=4, top_k=2, rank=2, capacity_factor=1.0, gate_dropout=0.0,
                             target_modules=("q_proj", "v_proj", "down_proj")), False),
    "loramoe-dense": (LoRAMoEConfig(num_experts=3, rank=2, target_modules=("q_proj", "down_proj"),
                                    balance_weight=0.0), True),
}


def routed(config):
    """A fresh tiny Llama with 3 frozen experts and `config`'s router (the same in every process: seeded)."""
    tokenizer = word_tokenizer(WORDS)
    base = tiny_llama_for(tokenizer)
    return attach_router(base, config, None if config.trains_experts else experts(base, n=3)), tokenizer


def state(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}


def _rank_main(rank: int, port: int, out: str) -> None:
    """One rank, started as torchrun would start it (environment only: train_router joins the group)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_backend.DENSE_COLUMNS_PER_SLOT = 0
    try:
        for case, (config, _) in CASES.items():
            model, tokenizer = routed(config)
            history = train_router(model, tokenizer, EXAMPLES, steps=STEPS, lr=LR, batch_size=BATCH, seed=SEED,
                                   progress=False)
            save_file(state(model), f"{out}/{case}-{rank}.safetensors")
            with open(f"{out}/{case}-{rank}.json", "w") as f:
                json.dump(vars(history), f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every case trained once by 2 gloo processes: {case: [(state, history) of rank 0, of rank 1]}."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return {case: [(load_file(out / f"{case}-{r}.safetensors"), json.loads((out / f"{case}-{r}.json").read_text()))
                   for r in range(WORLD)] for case in CASES}


def shard_mean_reference(config) -> tuple[dict, list[float]]:
    """One process, written out: Adam on the mean of the WORLD shards' gradients of each global batch."""
    model, tokenizer = routed(config)
    params = router_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    for router in routers_of(model).values():
        router.train()
    optimizer = torch.optim.Adam(params, lr=LR)
    draws = _batches(len(EXAMPLES), BATCH * WORLD, random.Random(SEED))
    tasks = []
    for _ in range(STEPS):
        drawn, task_sum = next(draws), 0.0
        for shard in (drawn[:BATCH], drawn[BATCH:]):
            batch = encode_pairs(model, tokenizer, [EXAMPLES[i] for i in shard])
            with router_outputs(model) as records:
                task = example_losses(model, batch).mean()
            aux, _ = summarize(records)
            ((task + sum(aux.values(), torch.zeros(()))) / WORLD).backward()
            task_sum += float(task.detach()) / WORLD
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tasks.append(task_sum)
    return state(model), tasks


@pytest.mark.parametrize("case", CASES)
def test_ranks_agree_with_each_other_and_with_one_process(ranks, case, monkeypatch):
    monkeypatch.setattr(torch_backend, "DENSE_COLUMNS_PER_SLOT", 0)  # the ranks' walk
    config, pooled = CASES[case]
    (state0, history0), (state1, history1) = ranks[case]
    assert state0.keys() == state1.keys()
    for name in state0:
        assert torch.equal(state0[name], state1[name]), name  # the same averaged gradients, the same Adam steps
    assert history0 == history1 and len(history0["task"]) == STEPS
    initial = state(routed(config)[0])
    assert any(not torch.equal(state0[n], initial[n]) for n in state0)  # it trained
    reference, tasks = shard_mean_reference(config)
    for name in state0:
        torch.testing.assert_close(state0[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(history0["task"], tasks, atol=1e-5, rtol=1e-5)
    if pooled:
        model, tokenizer = routed(config)
        one = train_router(model, tokenizer, EXAMPLES, steps=STEPS, lr=LR, batch_size=BATCH * WORLD, seed=SEED,
                           progress=False)
        for name, tensor in state(model).items():
            torch.testing.assert_close(state0[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(history0["loss"], one.loss, atol=1e-5, rtol=1e-5)


def test_route_train_under_torchrun_writes_once_and_equals_one_process(tmp_path):
    tokenizer = word_tokenizer(WORDS)
    model = tiny_llama_for(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    AdapterZoo(experts(model, n=3)).save(tmp_path / "zoo")
    (tmp_path / "ex.jsonl").write_text("".join(json.dumps({"input": x, "output": y}) + "\n" for x, y in EXAMPLES))
    common = ["route", "train", "--method", "mole", "--zoo", str(tmp_path / "zoo"), "--model",
              str(tmp_path / "model"), "--examples", str(tmp_path / "ex.jsonl"), "--balance-weight", "0", "--steps",
              "3"]  # dense (no --top-k): see CASES
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lorahub_engine.cli", *common, "--batch-size", "2", "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote") == 1 and two.stdout.count("task loss") == 1  # rank 0 alone prints
    assert main([*common, "--batch-size", "4", "-o", str(tmp_path / "one")]) == 0  # one process, the same batches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex.jsonl", "model", "one", "two", "zoo"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["router.json", "router.safetensors"]
    two_tensors, one_tensors = (load_file(tmp_path / d / "router.safetensors") for d in ("two", "one"))
    assert two_tensors.keys() == one_tensors.keys()
    for name in one_tensors:
        torch.testing.assert_close(two_tensors[name], one_tensors[name], atol=1e-5, rtol=1e-4, msg=name)
