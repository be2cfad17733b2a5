"""Launch configurations shared by the Triton launchers: ``triton.autotune`` on a GPU, fixed blocks otherwise.

Every kernel is wrapped in ``triton.autotune`` with ``prune_configs_by=fixed_or_tuned(NAMES)``. A
launcher passes the block sizes itself only when they are fixed: under the CPU interpreter (small
blocks; ``kdengine.kernels.runtime.interpreting()`` is read at call time) or when a caller asks for given
blocks. Then the pruner returns one empty config, so nothing is benchmarked, and the block names,
which each kernel's tuning key lists, give that launch its own cache entry. On a GPU the launchers
pass no block sizes and the autotuner times ``kernel.configs`` once per key (the tuning key plus
every tensor argument's dtype, which ``triton.autotune`` appends itself).

Launchers call ``kernel[grid](*args, **kwargs)`` with ``grid`` a function of the chosen config, and
look the kernel up as a module global at call time (so an ahead-of-time compile can record the
arguments by swapping the kernel object for a recorder and calling the launcher on meta tensors).
"""

from __future__ import annotations

import triton


def configs(table: list[tuple]) -> list[triton.Config]:
    """triton.Config list from rows (block-size dict, num_warps, num_stages)."""
    return [triton.Config(dict(blocks), num_warps=warps, num_stages=stages) for blocks, warps, stages in table]


def fixed_or_tuned(names: tuple[str, ...]) -> dict:
    """``prune_configs_by`` for triton.autotune: no tuning when the launch fixes any of ``names``."""

    def prune(configs, named_args, **kwargs):
        if any(name in kwargs for name in names):
            return [triton.Config({}, num_warps=None, num_stages=None, num_ctas=None)]
        return configs

    return {"early_config_prune": prune}
