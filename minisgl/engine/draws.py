"""Counter-based randomness for sampling: the draw of row i looks only at (seeds[i], steps[i], token index),
hashed with splitmix64 in int64 torch ops. A request therefore gets the same tokens whatever else shares its
batch and wherever it sits. This is the reference the fused draws (Triton on CUDA, csrc/gumbel.h on the CPU)
reproduce exactly.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def signed64(x: int) -> int:
    """The int64 that has the same 64 bits as `x` (torch has no uint64 arithmetic)."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


GOLDEN = signed64(0x9E3779B97F4A7C15)  # splitmix64's stream increment
_MUL1 = signed64(0xBF58476D1CE4E5B9)
_MUL2 = signed64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking off the sign-extended bits makes it a logical shift.
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output mix on int64 bit patterns (multiplication wraps mod 2**64, as the hash needs)."""
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def random_bits(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """64 random bits per (row, token): int64 [B, V], a function of (seeds[i], steps[i], token) only.

    Row key = output number `step + 1` of the splitmix64 stream seeded with mix(seed); token t's bits are
    output number `t + 1` of the stream seeded with that key. Distinct steps give unrelated keys, so draws
    at different steps are independent.
    """
    key = splitmix64(splitmix64(seeds) + (steps + 1) * GOLDEN)
    tokens = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds.device)
    return splitmix64(key[:, None] + tokens[None, :] * GOLDEN)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise, float32 [B, V], deterministic in (seed, step, token)."""
    bits = random_bits(seeds, steps, vocab_size)
    # 53 bits through float64: 24-bit float32 uniforms would clip the Gumbel tails that decide rare tokens.
    u = (_shr(bits, 11).to(torch.float64) + 0.5) * 2.0**-53  # strictly inside (0, 1)
    return (-torch.log(-torch.log(u))).to(torch.float32)
