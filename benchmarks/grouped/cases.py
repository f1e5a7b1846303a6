"""bench_grouped's cases: the shapes, independent baselines (per-expert loop, dense), routings, random adapters and
the models they run in (ours, PEFT, dense hooks)."""

from __future__ import annotations

import torch
from torch import nn

import lorahub_engine as le

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
          "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}  # (in, out)
ROWS, SEQ, RANK, EXPERTS, TOP_K, SEED = 32, 64, 8, 16, 2, 0

# ---------------------------------------------------------------- baselines (independent of the op)


def per_expert_loop(x, A, B, scale, idx, gates):
    """Plain loop: for each expert, gather its (token, slot) pairs, two matmuls, scatter-add."""
    y = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    for e in range(A.shape[0]):
        t, j = (idx == e).nonzero(as_tuple=True)
        if t.numel():
            w = (gates[t, j] * scale[e]).to(x.dtype)[:, None]
            y.index_add_(0, t, w * (x[t] @ A[e].T @ B[e].T))
    return y


def dense_all_experts(x, A, B, scale, idx, gates):
    """Every expert on every token, fused: (x @ A_all^T * w) @ B_all^T, w zero off the top-k (the strong dense)."""
    E, r, d_in = A.shape
    w = dense_weights(x, scale, idx, gates)  # (T, E)
    u = (x @ A.reshape(E * r, d_in).T).view(-1, E, r) * w[:, :, None]  # (T, E, r)
    return u.reshape(-1, E * r) @ B.permute(1, 0, 2).reshape(B.shape[1], E * r).T  # (T, out)


def dense_each_expert(x, A, B, scale, idx, gates):
    """Every expert on every token one after another, outputs weighted and summed (the literal dense MoE-LoRA)."""
    w = dense_weights(x, scale, idx, gates)  # (T, E)
    y = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    for e in range(A.shape[0]):
        y += w[:, e : e + 1] * (x @ A[e].T @ B[e].T)
    return y


def dense_weights(x, scale, idx, gates):
    """w[t, e] = scale[e] * the gate of expert e in token t's top-k, else 0."""
    w = torch.zeros(x.shape[0], scale.shape[0], dtype=x.dtype, device=x.device)
    w.scatter_add_(1, idx.clamp(min=0), torch.where(idx >= 0, gates, 0).to(x.dtype))
    return w * scale.to(x.dtype)


# ---------------------------------------------------------------- routing and adapters


def assignments(device, g: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token (idx [T, k], gates [T, k]) of each scenario, T = ROWS * SEQ."""
    T = ROWS * SEQ
    rows = torch.arange(ROWS).repeat_interleave(SEQ) % EXPERTS
    top = torch.rand(T, EXPERTS, generator=g).topk(TOP_K, dim=1).indices
    gates = torch.softmax(torch.randn(T, TOP_K, generator=g), dim=1)
    return {
        "one_adapter": (torch.zeros(T, 1, dtype=torch.long).to(device), torch.ones(T, 1, device=device)),
        "16_distinct": (rows[:, None].to(device), torch.ones(T, 1, device=device)),
        "top2_of_16": (top.to(device), gates.to(device)),
    }


def random_adapters(model: nn.Module, n: int, g: torch.Generator) -> list[le.LoraAdapter]:
    paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and p.rpartition(".")[2] in TARGETS]
    adapters = []
    for i in range(n):
        modules = {}
        for p in paths:
            lin = model.get_submodule(p)
            A = torch.randn(RANK, lin.in_features, generator=g) / lin.in_features**0.5
            B = torch.randn(lin.out_features, RANK, generator=g) / RANK**0.5
            modules[p] = le.LoraModule(A, B, 2.0)  # alpha 16 / r 8
        adapters.append(le.LoraAdapter(f"a{i}", modules))
    return adapters


def peft_model(base: nn.Module, adapters: list[le.LoraAdapter]) -> nn.Module:
    """PEFT's LoRA with the same factors, one named adapter per bank entry."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=2.0 * RANK, target_modules=list(TARGETS), init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name=adapters[0].name)
    for a in adapters[1:]:
        model.add_adapter(a.name, config)
    with torch.no_grad():
        for a in adapters:
            for path, m in a.modules.items():
                layer = model.base_model.model.get_submodule(path)
                layer.lora_A[a.name].weight.copy_(m.A)
                layer.lora_B[a.name].weight.copy_(m.B)
    return model.eval()


class DenseHooks:
    """Adds the dense all-experts delta to every target Linear of a plain model (the naive MoE-LoRA baseline)."""

    def __init__(self, model: nn.Module, adapters: list[le.LoraAdapter], idx, gates, trainable: bool):
        self.handles, self.params = [], []
        dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        for path in adapters[0].modules:
            A = torch.stack([a.modules[path].A for a in adapters]).to(dev, dtype).requires_grad_(trainable)
            B = torch.stack([a.modules[path].B for a in adapters]).to(dev, dtype).requires_grad_(trainable)
            scale = torch.tensor([a.modules[path].scale for a in adapters], device=dev)
            self.params += [A, B]
            hook = self._hook(A, B, scale, idx, gates)
            self.handles.append(model.get_submodule(path).register_forward_hook(hook))

    @staticmethod
    def _hook(A, B, scale, idx, gates):
        def hook(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1])  # (T, in)
            return out + dense_all_experts(x, A, B, scale, idx, gates).view(out.shape)

        return hook



def build_body(layers: int, device, dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    return LlamaModel(config).to(device, dtype).eval().requires_grad_(False)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
