"""Triton kernels (imported as ``kdengine.kernels``).

Each file holds one op: ``_name_kernel`` (@triton.jit) -> launcher -> autograd.Function.
The public entry points live in ``kdengine.losses`` and dispatch here with ``impl="triton"``.
"""
