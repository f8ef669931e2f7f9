"""Types and helpers that every layer of minisgl shares: the per-step batch layout and host-to-device copies.

This package sits at the bottom of the import order (docs/architecture.md): it imports nothing else of minisgl.
"""

from minisgl.core.forward_batch import ForwardBatch, ForwardMode
from minisgl.core.transfer import to_device

__all__ = ["ForwardBatch", "ForwardMode", "to_device"]
