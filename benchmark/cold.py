"""Timing a kernel with its weights out of L2, as a decode step meets them (it streams gigabytes between two
calls of one layer), and the timing options quant_kernels.py and w4_gemv_variants.py share. Needs a CUDA GPU."""

from __future__ import annotations

import argparse
from typing import Callable

import torch

_COLD_REPS = 25
_evict_buffers: dict[int, torch.Tensor] = {}


def bench_cold(kernel_call, return_mode: str = "median") -> float:
    """Milliseconds of one `kernel_call` (median of five replays; `return_mode` is accepted for triton.testing's
    signature). Both timings are CUDA-graph replays, since a launch from Python costs as much as a GEMV:
    replays of (read a buffer twice L2's size, kernel) minus replays of the read alone. Timing back-to-back
    replays instead keeps a small layer's weights (qkv, o) in L2 and overstates their bandwidth."""
    index = torch.cuda.current_device()
    if index not in _evict_buffers:
        l2 = torch.cuda.get_device_properties(index).L2_cache_size
        _evict_buffers[index] = torch.ones(l2 // 2, dtype=torch.float32, device=f"cuda:{index}")
    evict = _evict_buffers[index]
    sink = torch.empty((), dtype=torch.float32, device=evict.device)
    kernel_call()
    torch.cuda.synchronize()

    def replay_ms(with_kernel: bool) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(_COLD_REPS):
                torch.sum(evict, dim=0, out=sink)
                if with_kernel:
                    kernel_call()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    return max(1e-4, (replay_ms(True) - replay_ms(False)) / _COLD_REPS)


def add_timing_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cudagraph", action="store_true", help="time CUDA-graph replays (no launch overhead)")
    ap.add_argument("--cold", action="store_true", help="time graph replays with the weights out of L2 (as decode)")


def chosen_bench(args: argparse.Namespace) -> Callable[..., float]:
    """bench(fn, return_mode="median") -> ms, as --cold / --cudagraph ask (plain triton do_bench otherwise)."""
    import triton

    if args.cold:
        return bench_cold
    return triton.testing.do_bench_cudagraph if args.cudagraph else triton.testing.do_bench
