"""LLaVA model assembly: build, freeze, and hidden-state forward for distillation."""
