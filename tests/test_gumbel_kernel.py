"""The fused Gumbel-max kernel draws exactly the token that the op-by-op reference draws.

On the CPU it runs under Triton's interpreter; on CUDA natively, and `sample()` there uses it."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
pytest.importorskip("triton")

from minisgl.engine.draws import gumbel_noise, signed64  # noqa: E402
from minisgl.engine.sampling import SamplingBatch, sample  # noqa: E402
from minisgl.kernels.gumbel import gumbel_argmax  # noqa: E402
from minisgl.sampling_params import SamplingParams  # noqa: E402

SEEDS = [0, 1, 2**63 + 5, 12345678901234567, 2**64 - 1, 42]
STEPS = [0, 1, 7, 100, 2**40, 3]


def _case(v: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(v)
    x = torch.randn(len(SEEDS), v, generator=g) * 3
    x[1, 100:] = float("-inf")  # a filtered row: only its first 100 columns may win
    x[2] = float("-inf")  # nothing left at all: column 0, like torch.argmax
    x[3, v // 2] = float("nan")  # NaN ranks first, like torch.argmax
    seeds = torch.tensor([signed64(s) for s in SEEDS])
    steps = torch.tensor(STEPS)
    return x.to(device), seeds.to(device), steps.to(device)


@pytest.mark.parametrize("v", [1, 1000, 3001])
def test_kernel_equals_reference(v):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, seeds, steps = _case(v, device)
    ref = (x + gumbel_noise(seeds, steps, v)).argmax(dim=-1)
    assert gumbel_argmax(x, seeds, steps).tolist() == ref.tolist()
    # With flat logits the winner is wherever the noise peaks: checks the hash itself, column by column.
    flat = torch.zeros_like(x)
    assert gumbel_argmax(flat, seeds, steps).tolist() == gumbel_noise(seeds, steps, v).argmax(dim=-1).tolist()


@pytest.mark.gpu
def test_cuda_sample_equals_cpu_sample():
    v = 151936
    x, _, _ = _case(v, "cpu")
    params = [
        SamplingParams(temperature=t, top_k=k, seed=s)
        for t, k, s in zip([0.6, 1.0, 0.0, 1.3, 0.8, 1.0], [0, 50, 0, 0, 5, 0], SEEDS)
    ]
    steps = [0, 1, 7, 100, 2**40, 3]

    def run(device: str) -> list[int]:
        sb = SamplingBatch.build(params, SEEDS, steps, [[1]] * 6, [[]] * 6, v, torch.device(device))
        return sample(x.to(device), sb).token_ids.tolist()

    assert run("cuda") == run("cpu")
