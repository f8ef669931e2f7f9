"""Host-to-device copies of small per-step index lists that never stall the host.

A plain `torch.tensor(values, device="cuda")` copies from pageable memory, and PyTorch makes such a copy wait
for everything already queued on the stream: the host would then sit idle for the whole previous step, which
defeats overlap scheduling. Staging through pinned memory lets the copy queue behind the work like a kernel.
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list, or a list of equal-length lists) as a tensor on `device`, copied asynchronously
    when that is a GPU.

    Safe to reuse or drop `values` at once: the data is in a pinned buffer that PyTorch's caching host
    allocator does not hand out again until the copy has run.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype).to(device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
