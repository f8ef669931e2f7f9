"""Linear layers that know how to load (and, under tensor parallelism, slice) HuggingFace weights."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.distributed.info import TPInfo
from minisgl.quant import QuantConfig, QuantMethod
from minisgl.quant.blocks import QuantizedBlocks, as_dense


class Linear(nn.Module):
    """y = x W^T (+ b). With `parallel="column"` each rank holds a slice of the outputs; with "row" a slice
    of the inputs and the partial sums are all-reduced. `shards` lists the output sizes of weights that
    HF stores separately but we fuse (q/k/v, gate/up); `load(tensor, shard_index)` copies one of them in.
    `slices[i]` (column parallel) is how many distinct slices shard i is cut into, tp.size by default; fewer
    means ranks share a slice, as GQA's kv heads are replicated when there are fewer of them than ranks.

    Built with a `quant` config, the layer allocates no weight until `create_weights(method)` is called (by
    `CausalLM.bind_quant`, once the model is built): then either `method` stores it quantized, or (None) it is
    a dense Parameter as without quantization. Tensor-parallel slices of a quantized weight are cut before
    quantizing (or, for pre-quantized blocks, at group boundaries), so groups never straddle ranks.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | list[int],
        bias: bool = False,
        parallel: str | None = None,
        tp: TPInfo = TPInfo(),
        slices: list[int] | None = None,
        quant: QuantConfig | None = None,
    ):
        super().__init__()
        self.tp = tp
        self.parallel = parallel
        full_shards = out_features if isinstance(out_features, list) else [out_features]
        self.slices = slices or [tp.size] * len(full_shards)
        if parallel == "column":
            for n, k in zip(full_shards, self.slices):
                if n % k:
                    raise ValueError(f"output size {n} does not split into {k} tensor-parallel slices")
            self.shards = [n // k for n, k in zip(full_shards, self.slices)]
            self.in_features = in_features
        elif parallel == "row":
            self.shards = full_shards
            self.in_features = tp.shard(in_features, "input size")
        else:
            self.shards = full_shards
            self.in_features = in_features
        self.out_features = sum(self.shards)
        self.quant = quant
        self.method: QuantMethod | None = None
        if quant is None:
            self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features), requires_grad=False)
        else:
            self.register_parameter("weight", None)
        # Under row parallelism only rank 0 adds the bias, so the all-reduce adds it once.
        has_bias = bias and not (parallel == "row" and tp.rank != 0)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if has_bias else None

    def create_weights(self, method: QuantMethod | None) -> None:
        """Allocate the weight of a layer built with `quant`: quantized by `method`, or dense if None."""
        self.method = method
        if method is None:
            self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features), requires_grad=False)
        else:
            method.create_weights(self, self.out_features, self.in_features)

    def load(self, name: str, tensor: torch.Tensor | QuantizedBlocks, shard: int = 0) -> None:
        """Copy one HF tensor (weight or bias, possibly one of the fused shards) into place."""
        is_weight = name.endswith("weight")
        if not is_weight and self.bias is None:  # bias of a row-parallel layer on rank > 0
            return
        tp = self.tp
        if self.parallel == "column":
            size = self.shards[shard]
            index = tp.rank * self.slices[shard] // tp.size
            tensor = tensor.narrow(0, index * size, size)
        elif self.parallel == "row" and is_weight:
            tensor = tensor.narrow(1, tp.rank * self.in_features, self.in_features)
        start = sum(self.shards[:shard])
        if is_weight:
            self.write_rows(start, tensor)
        else:
            self.bias.data.narrow(0, start, tensor.shape[0]).copy_(tensor)

    def write_rows(self, start: int, weight: torch.Tensor | QuantizedBlocks) -> None:
        """Store rows [start, start + len(weight)) of this rank's weight (quantizing them if the layer is)."""
        if self.method is not None:
            self.method.load_rows(self, start, weight)
        else:
            self.weight.data.narrow(0, start, weight.shape[0]).copy_(as_dense(weight))

    def finalize(self) -> None:
        """Called once every row is loaded: lets the method re-lay the weight out for its kernels."""
        if self.method is not None:
            self.method.finalize(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = self.method.apply(self, x)
            if self.bias is not None:
                y = y + self.bias
        if self.parallel == "row":
            y = self.tp.all_reduce(y)
        return y


def vocab_slice(vocab_size: int, tp: TPInfo) -> tuple[int, int, int]:
    """(rows per rank, this rank's first vocabulary id, how many of its rows are real ids): each rank holds an
    equal, padded slice of the vocabulary; the last rank's padding rows hold zeros."""
    per_rank = -(-vocab_size // tp.size)
    start = tp.rank * per_rank
    return per_rank, start, max(0, min(per_rank, vocab_size - start))


class VocabEmbedding(nn.Module):
    """Token embedding, split over ranks by vocabulary range; out-of-range rows contribute zeros."""

    def __init__(self, vocab_size: int, dim: int, tp: TPInfo = TPInfo()):
        super().__init__()
        self.tp = tp
        self.per_rank, self.start, self.rows = vocab_slice(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim), requires_grad=False)
        # ids -> rows from a quantized head that holds this table exactly (LMHead.finalize), else None
        self.rows_from: Callable[[torch.Tensor], torch.Tensor] | None = None

    def load(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        self.weight.data[: self.rows].copy_(tensor[self.start : self.start + self.rows])
        self.weight.data[self.rows :].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.rows_from is not None:
            return self.rows_from(ids).to(self.weight.dtype)
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(mask, 0), self.weight)
        out.masked_fill_(mask.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class LMHead(nn.Module):
    """Logits over the vocabulary. Each rank computes its vocabulary slice; slices are gathered on all ranks.

    Built with a `quant` config, the head computes through `proj`, a Linear over this rank's (padded)
    vocabulary slice whose weight `create_weights` allocates, quantized or dense. A tied head that stays dense
    drops `proj` and reads the embedding; a tied head that is quantized keeps its own quantized copy, loaded
    from the embedding's tensor (the embedding stays dense unless `finalize` lets it read the copy). With
    `dense_from_rows` set, batches of at least that many rows multiply by the dense embedding instead.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        tp: TPInfo = TPInfo(),
        tied: VocabEmbedding | None = None,
        quant: QuantConfig | None = None,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.tp = tp
        self.tied = tied
        self.proj: Linear | None = None
        self.dense_from_rows: int | None = None
        if quant is not None:
            self.per_rank, self.start, self.rows = vocab_slice(vocab_size, tp)  # as VocabEmbedding slices
            self.proj = Linear(dim, self.per_rank, quant=quant)
        elif tied is None:
            self.embed = VocabEmbedding(vocab_size, dim, tp)

    @property
    def weight(self) -> torch.Tensor:
        return (self.tied if self.tied is not None else self.embed).weight

    @property
    def method(self) -> QuantMethod | None:
        return self.proj.method if self.proj is not None else None

    def create_weights(self, method: QuantMethod | None) -> None:
        if method is None and self.tied is not None:
            self.proj = None
        else:
            self.proj.create_weights(method)

    def load(self, name: str, tensor: torch.Tensor | QuantizedBlocks, shard: int = 0) -> None:
        if self.proj is not None:
            if self.rows:
                self.proj.write_rows(0, tensor.narrow(0, self.start, self.rows))
            if self.rows < self.per_rank:
                self.proj.write_rows(self.rows, torch.zeros(self.per_rank - self.rows, self.proj.in_features))
        elif self.tied is None:
            self.embed.load(name, tensor)

    def finalize(self) -> None:
        """Once loaded: a tied embedding whose rows this head's int8 copy holds exactly (a GGUF's Q8_0 table), and
        that the head never multiplies by, reads its rows from the copy and frees its own dense table."""
        tied, proj = self.tied, self.proj
        if tied is None or proj is None or self.dense_from_rows is not None or tied.tp.size != 1:
            return
        if getattr(proj, "int8_exact", False):  # set by the CPU int8 method (quant/int8.py)
            tied.rows_from = functools.partial(proj.method.dequantize, proj)
            tied.weight = nn.Parameter(tied.weight.new_empty(0, tied.weight.shape[1]), requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.proj is None or (self.dense_from_rows is not None and h.shape[0] >= self.dense_from_rows):
            logits = F.linear(h, self.weight)
        else:
            logits = self.proj(h)
        logits = self.tp.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
