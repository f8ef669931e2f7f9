"""Mixture-of-experts MLP (Qwen3-MoE style): softmax router, top-k experts, SiLU-gated experts."""

from __future__ import annotations

import re

import torch
from torch import nn

from minisgl.distributed.info import TPInfo
from minisgl.layers.activation import silu_and_mul
from minisgl.layers.linear import Linear


class MoE(nn.Module):
    """Experts stored stacked: w13[e] = [gate; up] ([2I, H]) and w2[e] ([H, I]).

    Under tensor parallelism each rank keeps every expert with a slice of the intermediate dimension and
    the partial outputs are all-reduced. The plain implementation loops over experts that got tokens.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, renorm: bool, tp: TPInfo):
        super().__init__()
        self.tp = tp
        self.top_k = top_k
        self.renorm = renorm
        self.inter = tp.shard(intermediate, "moe_intermediate_size")
        self.gate = Linear(hidden, num_experts)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, self.inter), requires_grad=False)

    _name = re.compile(r"experts\.(\d+)\.(gate|up|down)_proj")

    def load(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        m = self._name.search(name)
        if m is None:
            raise KeyError(name)
        e, kind = int(m.group(1)), m.group(2)
        i, r = self.inter, self.tp.rank
        if kind == "down":
            self.w2.data[e].copy_(tensor.narrow(1, r * i, i))
        else:
            self.w13.data[e].narrow(0, 0 if kind == "gate" else i, i).copy_(tensor.narrow(0, r * i, i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renorm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        flat = experts.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.w13.shape[0]).tolist()
        token_of = order // self.top_k
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = order[start : start + n]
            toks = token_of[start : start + n]
            start += n
            h = silu_and_mul(x[toks] @ self.w13[e].t()) @ self.w2[e].t()
            out.index_add_(0, toks, h * weights.flatten()[rows].unsqueeze(-1))
        return self.tp.all_reduce(out)
