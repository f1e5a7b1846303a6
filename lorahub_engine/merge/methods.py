"""The registered merge methods. Each maps one module's tasks to its merged dW, as factors or dense.

Notation: adapter i has factors A_i (r_i, in), B_i (out, r_i), scale s_i, merge weight w_i; dW_i = s_i B_i A_i.
An adapter that lacks a module contributes zero there (it is simply absent from that module's tasks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorahub_engine.errors import MergeError
from lorahub_engine.merge.functional import KeepMask, combine, dare_keep, magnitude_keep
from lorahub_engine.merge.linalg import lowrank_svd, shared_basis
from lorahub_engine.merge.lorahub_factors import lorahub_factors
from lorahub_engine.merge.registry import METHODS, LowRank, MergeOptions, MethodResult, ModuleTasks, register


def concat(tasks: ModuleTasks, sign: float = 1.0) -> LowRank:
    """Ranks concatenated: B = [B_1 ... B_n] (out, sum r_i), A = [w_1 s_1 A_1; ...] (sum r_i, in), so
    B A = sum_i w_i s_i B_i A_i exactly. PEFT's `cat` lays the factors out the same way."""
    B = torch.cat([sign * lora.B for lora in tasks.loras], dim=1)
    A = torch.cat([w * lora.scale * lora.A for w, lora in zip(tasks.weights, tasks.loras)], dim=0)
    return LowRank(B, A)


@register("task_arithmetic", paper="https://arxiv.org/abs/2212.04089")
@register("cat", paper="https://arxiv.org/abs/2212.04089")
def task_arithmetic(tasks: ModuleTasks, options: MergeOptions) -> MethodResult:
    """Exact sum_i w_i s_i B_i A_i (Ilharco et al. 2023) with ranks concatenated; `rank=k` recompresses by SVD."""
    return concat(tasks)


@register("svd", paper="https://arxiv.org/abs/2212.04089")
def svd(tasks: ModuleTasks, options: MergeOptions) -> MethodResult:
    """Task arithmetic in SVD form: B = U S, A = V^T of sum_i w_i s_i B_i A_i, truncated to `rank` (all kept when
    None). Computed from the concatenated factors; PEFT's `svd` gives the same dW, through a dense SVD."""
    return LowRank(*lowrank_svd(*concat(tasks), options.rank))


@register("negate", paper="https://arxiv.org/abs/2306.14870")
def negate(tasks: ModuleTasks, options: MergeOptions) -> MethodResult:
    """Subtract skills (Zhang et al. 2023): -sum_i w_i s_i B_i A_i, the sign flipped on each B_i. With one adapter
    and weight 1 the result is that adapter with B negated (its scale folded into A)."""
    return concat(tasks, sign=-1.0)


@register("lorahub", paper="https://arxiv.org/abs/2307.13269")
def lorahub(tasks: ModuleTasks, options: MergeOptions) -> MethodResult:
    """LoraHub's factor mix: A = sum_i w_i sqrt(s_i) A_i, B = sum_i w_i sqrt(s_i) B_i. NOT task arithmetic: B A holds
    the cross terms w_i w_j B_i A_j on purpose. Mixed ranks are zero-padded to the largest."""
    r = max(lora.rank for lora in tasks.loras)
    A = torch.stack([torch.nn.functional.pad(lora.A, (0, 0, 0, r - lora.rank)) for lora in tasks.loras])  # (E, r, in)
    B = torch.stack([torch.nn.functional.pad(lora.B, (0, r - lora.rank)) for lora in tasks.loras])  # (E, out, r)
    scale = torch.tensor([lora.scale for lora in tasks.loras])
    A_m, B_m = lorahub_factors(A, B, scale, torch.tensor([tasks.weights]))  # (1, r, in), (1, out, r)
    return LowRank(B_m[0], A_m[0])


@dataclass(frozen=True)
class TaskArithmeticFamily:
    """sparsify -> consensus -> weighted combine (`functional.combine`), in one of two spaces.

    space="delta" (the correct semantics): the tasks are the weighted deltas u_i = w_i s_i B_i A_i, so trimming and
    DARE act on each dW_i, the sign is elected by the total weighted mass sum_i u_i (or by sum_i sign(u_i) with
    "frequency"), and with a consensus the result is the disjoint mean of the agreeing u_i, otherwise sum_i u_i.
    With equal weights w > 0 this is w times the paper's merged task vector. The result is dense; the u_i are
    rebuilt from the factors block by block, so the n dense deltas are never all in memory.
    space="factors" reproduces PEFT's `add_weighted_adapter`: c_i = w_i s_i, the method runs on the stacked A_i
    with weights sign(c_i) sqrt|c_i| and on the stacked B_i with weights sqrt|c_i|, the sign elected on the
    unweighted factors; all ranks of a module must agree and the result keeps that rank, scale 1.
    """

    keep: KeepMask | None
    rescale: bool  # survivors / density (DARE)
    consensus: bool

    def merge_tasks(self, task_rows: Callable[[int, slice], torch.Tensor], n: int, rows: int,
                    weights: torch.Tensor, options: MergeOptions, generator: torch.Generator) -> torch.Tensor:
        """Task i's rows r are task_rows(i, r); weights (n,) -> merged (rows, ...)."""
        return combine(task_rows, n, rows, weights, keep=self.keep, rescale=self.rescale, density=options.density,
                       consensus=options.majority_sign_method if self.consensus else None, generator=generator)

    def merge_stacked(self, tasks: torch.Tensor, weights: torch.Tensor, options: MergeOptions,
                      generator: torch.Generator) -> torch.Tensor:
        """tasks (n, rows, ...), weights (n,) -> merged (rows, ...)."""
        return self.merge_tasks(lambda i, r: tasks[i, r], len(tasks), tasks.shape[1], weights, options, generator)

    def __call__(self, tasks: ModuleTasks, options: MergeOptions) -> MethodResult:
        if options.space == "factors":
            return self._factors(tasks, options)
        if self.keep is None and not self.consensus:
            return concat(tasks)  # plain weighted sum: exact and low-rank
        coefs = [w * lora.scale for w, lora in zip(tasks.weights, tasks.loras)]

        def delta_rows(i: int, r: slice) -> torch.Tensor:
            return coefs[i] * (tasks.loras[i].B[r] @ tasks.loras[i].A)  # rows r of u_i: (len(r), in)

        out = tasks.loras[0].B.shape[0]
        return self.merge_tasks(delta_rows, len(coefs), out, torch.ones(len(coefs)), options,
                                tasks.generator(options.seed))

    def _factors(self, tasks: ModuleTasks, options: MergeOptions) -> LowRank:
        ranks = sorted({lora.rank for lora in tasks.loras})
        if len(ranks) > 1:
            raise MergeError(f"module {tasks.name!r}: space='factors' needs equal ranks, got {ranks}; "
                             "use space='delta' (or method 'cat') for mixed ranks")
        c = [w * lora.scale for w, lora in zip(tasks.weights, tasks.loras)]
        w_B = torch.tensor([math.sqrt(abs(x)) for x in c])
        w_A = torch.tensor([1.0 if x >= 0 else -1.0 for x in c]) * w_B
        generator = tasks.generator(options.seed)
        A = self.merge_stacked(torch.stack([lora.A for lora in tasks.loras]), w_A, options, generator)
        B = self.merge_stacked(torch.stack([lora.B for lora in tasks.loras]), w_B, options, generator)
        return LowRank(B, A)


_DENSITY = ("density",)
_SIGN = ("density", "majority_sign_method")
register("linear", paper="https://arxiv.org/abs/2212.04089")(
    TaskArithmeticFamily(keep=None, rescale=False, consensus=False))
register("ties", paper="https://arxiv.org/abs/2306.01708", options=_SIGN)(
    TaskArithmeticFamily(keep=magnitude_keep, rescale=False, consensus=True))
register("dare_linear", paper="https://arxiv.org/abs/2311.03099", options=_DENSITY)(
    TaskArithmeticFamily(keep=dare_keep, rescale=True, consensus=False))
register("dare_ties", paper="https://arxiv.org/abs/2311.03099", options=_SIGN)(
    TaskArithmeticFamily(keep=dare_keep, rescale=True, consensus=True))
register("magnitude_prune", paper="https://arxiv.org/abs/2306.01708", options=_DENSITY)(
    TaskArithmeticFamily(keep=magnitude_keep, rescale=False, consensus=False))
KNOTS_INNER = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@register("knots", paper="https://arxiv.org/abs/2410.19735", spaces=("delta",),
          options=("density", "majority_sign_method", "knots_method"))
def knots(tasks: ModuleTasks, options: MergeOptions) -> MethodResult:
    """KnOTS (Stoica et al. 2024) on the weighted deltas u_i = w_i s_i B_i A_i: the SVD of [u_1 ... u_n] gives a
    shared basis U S and per-task coordinates V_i^T (u_i = U S V_i^T); `knots_method` (a task-arithmetic-family
    method, delta semantics) merges the V_i^T entry by entry, and dW = U S V_merged^T keeps rank sum r_i."""
    U, S, coords = shared_basis([lora.B for lora in tasks.loras],
                                [w * lora.scale * lora.A for w, lora in zip(tasks.weights, tasks.loras)])
    inner: TaskArithmeticFamily = METHODS[options.knots_method].fn
    merged = inner.merge_stacked(torch.stack(coords), torch.ones(len(coords)), options, tasks.generator(options.seed))
    return LowRank(U * S, merged)
