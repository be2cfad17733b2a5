"""kdengine: kernel-accelerated LLaVA-KD distillation for multimodal LLMs.

Layout: ``kdengine.losses`` (public loss API, torch paths and references),
``kdengine.kernels`` (Triton kernels; the top-level ``kernels/`` folder),
``kdengine.model`` (LLaVA model assembly), ``kdengine.data`` (LLaVA data
pipeline and synthetic data).
"""

__version__ = "0.1.0"
