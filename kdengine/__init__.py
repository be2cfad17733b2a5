"""kdengine: kernel-accelerated LLaVA-KD distillation for multimodal LLMs.

Layout, from the entry points down: ``kdengine.cli`` (the ``kdengine`` command) and
``kdengine.demo`` (Table 2 in miniature) -> ``kdengine.train`` (the pt/sft/dpt/dft stages on
DeepSpeed from one YAML config) and ``kdengine.eval`` (generation, scoring, distillation
diagnostics) -> ``kdengine.losses`` (public loss API, torch paths and references; Triton kernels
in ``kdengine.kernels``, the top-level ``kernels/`` folder), ``kdengine.model`` (LLaVA model
assembly and the distillation forward) and ``kdengine.data`` (LLaVA data pipeline and synthetic
data).
"""

__version__ = "0.1.0"
