"""Triton kernels of the CUDA fast path (they also run on the CPU under `TRITON_INTERPRET=1`, for tests), and
`native`, the C++ kernels of the CPU decode path.

One module per kernel concept; each module's docstring states the tensor layouts it expects. Importing this
package does not import triton: the modules do, so CPU-only installs never need it.
"""
