"""core/transfer.py: small host lists reach the device intact, even when dropped before their copy runs."""

from __future__ import annotations

import pytest
import torch

from minisgl.core.transfer import to_device


@pytest.mark.gpu
def test_values_survive_behind_a_busy_stream():
    dev = torch.device("cuda")
    torch.cuda._sleep(200_000_000)  # none of the copies below runs before the host has dropped its lists
    outs = [to_device([i] * 1000, torch.int64, dev) for i in range(200)]
    outs += [to_device([[i, -i]] * 7, torch.int32, dev) for i in range(50)]
    outs.append(to_device([True, False, True], torch.bool, dev))
    torch.cuda.synchronize()
    for i in range(200):
        assert bool((outs[i] == i).all()), f"copy {i}"
    for i in range(50):
        assert outs[200 + i].tolist() == [[i, -i]] * 7
    assert outs[-1].tolist() == [True, False, True]


def test_cpu_device_gets_a_plain_tensor():
    t = to_device([[1, 2], [3, 4]], torch.int32, torch.device("cpu"))
    assert t.device.type == "cpu" and t.tolist() == [[1, 2], [3, 4]]
