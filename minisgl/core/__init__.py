"""What every layer of minisgl shares: the per-step batch layout (`forward_batch`), host-to-device copies
(`transfer`), the environment variables read (`settings`) and how CPU threads share the machine (`cpu_threads`).

This package sits at the bottom of the import order (docs/architecture.md): it imports nothing else of minisgl.
Its `__init__` imports nothing at all, so `cpu_threads` can be used before torch is loaded.
"""
