"""Runtime facts the Triton kernels read at call time.

``kernels/`` imports as ``kdengine.kernels`` and has no ``__init__.py`` on purpose: the top-level folder
is then at most a namespace portion, so Hugging Face's regular ``kernels`` package (which transformers
imports) always wins ``import kernels``, also with the repository root as the working directory.

Each file holds one op: ``_name_kernel`` (@triton.jit) -> launcher -> autograd.Function.
The public entry points live in ``kdengine.losses`` and dispatch here with ``impl="triton"``.
``divergence_terms.py`` holds the elementwise helpers shared by the divergence kernels.

Without a GPU the kernels run under Triton's interpreter: set ``TRITON_INTERPRET=1`` before
``kdengine.kernels`` is first imported (``@triton.jit`` reads it when it decorates;
``tests/conftest.py`` sets it when there is no GPU).
"""

import os


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
