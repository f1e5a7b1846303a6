"""Data-parallel router training across processes (torchrun, accelerate launch): this process's rank, its shard of
a global batch, and the collectives train_router needs. A single process (no process group, no launcher) is rank
0 of 1 and communicates nothing.

    ranks = join()                      # rank 0 of 1, or the process group (initialized from torchrun's env)
    mine = ranks.shard(global_batch)    # rank r: items [r*B, (r+1)*B) of the world*B drawn for the step
    ranks.average_gradients_(params)    # after backward: each gradient's mean over the ranks (one all-reduce)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, progress bars and messages."""
        return self.rank == 0

    def shard(self, batch: Sequence) -> list:
        """This rank's contiguous slice of a global batch of `world` equal parts."""
        size = len(batch) // self.world
        return list(batch[self.rank * size:(self.rank + 1) * size])

    @torch.no_grad()
    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy rank 0's values into `tensors` on every rank (one broadcast), so all ranks start equal."""
        if self.world == 1 or not tensors:
            return
        flat = _flat([t.detach() for t in tensors])
        dist.broadcast(flat, src=0)
        for t, value in zip(tensors, _unflat(flat, tensors)):
            t.copy_(value)

    @torch.no_grad()
    def average_gradients_(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks, in one all-reduce. A rank where a parameter got no
        gradient adds zeros; a parameter that no rank reached keeps None (Adam then skips it, as one process would)."""
        if self.world == 1 or not params:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        reached = torch.tensor([float(p.grad is not None) for p in params])
        flat = torch.cat([_flat(grads), reached.to(params[0].device)])  # (sum of numels + P,)
        dist.all_reduce(flat)
        hits = flat[-len(params):].tolist()
        for p, total, hit in zip(params, _unflat(flat[:-len(params)], params), hits):
            p.grad = (total / self.world).to(p.dtype) if hit else None

    @torch.no_grad()
    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of `values` over the ranks (float32)."""
        values = values.detach().float()
        if self.world == 1:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.world


def join() -> Ranks:
    """This process's rank and the world size: from the initialized default process group; else, when started by
    torchrun or accelerate launch (WORLD_SIZE > 1 in the environment), after initializing that group from the
    environment (NCCL for CUDA tensors and gloo for CPU ones where CUDA is available, gloo otherwise); else 0 of 1."""
    if not dist.is_available():
        return Ranks()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Ranks()
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def process_rank() -> int:
    """This process's rank in the initialized default process group; 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors as one float32 vector on the first one's device."""
    device = tensors[0].device
    return torch.cat([t.detach().float().flatten().to(device) for t in tensors])


def _unflat(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`flat` cut back into the shapes and devices of `like` (still float32)."""
    parts = flat.split([t.numel() for t in like])
    return [part.view(t.shape).to(t.device) for part, t in zip(parts, like)]
