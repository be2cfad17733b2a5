"""Test setup: Triton kernels run under the interpreter when there is no GPU.

TRITON_INTERPRET is read when @triton.jit decorates a function, so it is set here,
before any test module imports kdengine.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
